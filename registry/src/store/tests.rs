//! The backend-generic tests.
