//! Index newtypes: nodes, instances and groups live in `Vec`s inside a
//! [`crate::Cluster`] and refer to each other by position, so a move is three
//! small integers and cloning a cluster never chases pointers.

use serde::{Deserialize, Serialize};

macro_rules! index_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u32);

        impl $name {
            /// Position in the owning `Vec`.
            pub fn index(self) -> usize {
                self.0 as usize
            }

            /// The id of the element at `index`; panics past `u32::MAX`,
            /// which no cluster reaches.
            pub fn from_index(index: usize) -> Self {
                Self(u32::try_from(index).expect("cluster element index fits in u32"))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

index_type!(
    /// A node (host) of a [`crate::Cluster`].
    NodeId
);
index_type!(
    /// An instance (VM) of a [`crate::Cluster`].
    InstId
);
index_type!(
    /// A node group of a [`crate::Cluster`].
    GroupId
);
