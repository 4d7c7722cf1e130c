//! The export worker (skeleton: filled by the worker change).
