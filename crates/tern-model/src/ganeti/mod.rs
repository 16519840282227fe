//! Ganeti htools text format (the `-t FILE` backend of `hbal`, `hinfo`,
//! `hspace`): reading it into a [`Cluster`](crate::Cluster) and writing it back.
//!
//! The reader follows Ganeti 3.0's `Backend/Text.hs`: sections separated by one
//! empty line (groups, nodes, instances, cluster tags, instance policies; the
//! last two optional, further sections ignored), fields separated by `|`,
//! optional trailing fields defaulted as Ganeti defaults them, and a node whose
//! memory, disk or CPU fields contain `?` loaded as an offline node with zero
//! resources. Where Ganeti rejects a file, so does tern, with the line number,
//! the object and the field in the message. See `docs/ganeti-format.md`.

mod check;
mod parse;
pub mod tags;
mod write;

pub use check::missing_resources;
pub use parse::parse;
pub use write::serialize;
