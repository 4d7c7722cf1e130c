//! Black-box tests that start the real binaries; the tests themselves live in `it/`.
