//! The keeper server (see server body below).
