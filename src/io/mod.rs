//! Files on disk: atomic writes, digests, manifests, Parquet frames and input readers.

pub mod atomic;
pub mod inputs;
pub mod manifest;
pub mod parquet;
pub mod shards;
