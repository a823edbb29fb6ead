//! Run-time loaded driver symbol tables. Only this layer and `backend` touch driver symbols;
//! nothing here keeps state beyond the open library.

pub mod cuda;
pub mod ze;
