//! Names of VMs and hosts: one rule for both, checked once where a name enters tern (an
//! API request, a CLI argument, a spec) and carried as a [`VmName`] or [`HostName`] from
//! there.
//!
//! The rule: 1 to [`MAX_NAME_LEN`] characters of `a-z`, `0-9` and `-`, starting with a
//! letter or a digit. A VM's name becomes file and directory names (its RAM file, its
//! socket directory, whose path must stay under the kernel's 108-byte socket limit), part
//! of QEMU's `-name`, a key in URLs and metric labels; a host's name goes into URLs,
//! metric labels and the lab's state. Capitals, dots and `_` are refused so two names
//! never differ only in ways a file system, a URL or a reader might fold together.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize, Serializer};

/// The longest name, in characters (bytes: the rule allows only ASCII).
pub const MAX_NAME_LEN: usize = 48;

/// How to write a good name, appended to every [`NameError`].
const RULE: &str = "use 1-48 characters of a-z, 0-9 and '-', starting with a letter or digit";

/// What a name names, so an error says which name was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Vm,
    Host,
    /// An affinity or anti-affinity group of VMs.
    Group,
    /// An image of the manager's catalogue.
    Image,
    /// A template of the manager's catalogue.
    Template,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Vm => "VM",
            NameKind::Host => "host",
            NameKind::Group => "group",
            NameKind::Image => "image",
            NameKind::Template => "template",
        })
    }
}

/// Which part of the rule a name breaks (the first problem found, reading left to right).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameProblem {
    Empty,
    TooLong {
        len: usize,
    },
    /// `ch` at character position `at` (0-based) is not one of `a-z 0-9 -`.
    BadChar {
        ch: char,
        at: usize,
    },
    /// The name starts with `-` (it would read as an option on a command line).
    LeadingDash,
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameProblem::Empty => f.write_str("is empty"),
            NameProblem::TooLong { len } => {
                write!(f, "is {len} characters long, more than {MAX_NAME_LEN}")
            }
            NameProblem::BadChar { ch, at } => {
                write!(f, "has {ch:?} at position {at}, which is not allowed")
            }
            NameProblem::LeadingDash => f.write_str("starts with '-'"),
        }
    }
}

/// A name that breaks the rule: which kind of name, the name, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} name {name:?} is invalid: it {problem}; {RULE}")]
pub struct NameError {
    pub kind: NameKind,
    pub name: String,
    pub problem: NameProblem,
}

/// Checks `name` against the rule, without allocating unless it is wrong.
pub fn check(kind: NameKind, name: &str) -> Result<(), NameError> {
    problem(name).map_or(Ok(()), |problem| {
        Err(NameError {
            kind,
            name: name.to_owned(),
            problem,
        })
    })
}

/// The first way `name` breaks the rule, if it does (pure).
fn problem(name: &str) -> Option<NameProblem> {
    if name.is_empty() {
        return Some(NameProblem::Empty);
    }
    if let Some((at, ch)) = name
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
    {
        return Some(NameProblem::BadChar { ch, at });
    }
    // Only ASCII is left, so bytes are characters.
    if name.len() > MAX_NAME_LEN {
        return Some(NameProblem::TooLong { len: name.len() });
    }
    if name.starts_with('-') {
        return Some(NameProblem::LeadingDash);
    }
    None
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        ///
        /// Parsed with [`FromStr`] or [`TryFrom<String>`]; a JSON string that breaks the rule
        /// is refused when it is deserialised.
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl $name {
            /// What this type names, as its errors say it.
            pub const KIND: NameKind = $kind;

            /// Checks `name` against the rule without keeping it.
            pub fn check(name: &str) -> Result<(), NameError> {
                check(Self::KIND, name)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;

            fn try_from(name: String) -> Result<Self, NameError> {
                Self::check(&name)?;
                Ok(Self(name))
            }
        }

        impl FromStr for $name {
            type Err = NameError;

            fn from_str(name: &str) -> Result<Self, NameError> {
                Self::check(name)?;
                Ok(Self(name.to_owned()))
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Maps keyed by the name are looked up with a `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

name_type!(
    /// The name of a VM, unique in a cluster; it names the VM's files on its host.
    VmName,
    NameKind::Vm
);
name_type!(
    /// The name of an image in the manager's catalogue; it names the image's files in
    /// every host's store.
    ImageName,
    NameKind::Image
);
name_type!(
    /// The name of a template in the manager's catalogue.
    TemplateName,
    NameKind::Template
);
name_type!(
    /// The name of a host (the name its agent registers with).
    HostName,
    NameKind::Host
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn problem_of(name: &str) -> NameProblem {
        VmName::check(name).unwrap_err().problem
    }

    #[test]
    fn good_names_are_kept_as_given() {
        for ok in [
            "a",
            "0",
            "web-1",
            "h0001",
            "vm-00042",
            "a-",
            &"x".repeat(48),
        ] {
            let v: VmName = ok.parse().unwrap();
            assert_eq!(v.as_str(), ok);
            assert_eq!(v.to_string(), ok);
            let h = HostName::try_from(ok.to_owned()).unwrap();
            assert_eq!(String::from(h), ok);
        }
    }

    #[test]
    fn an_empty_name_is_refused() {
        assert_eq!(problem_of(""), NameProblem::Empty);
    }

    #[test]
    fn a_name_over_48_characters_is_refused() {
        assert_eq!(
            problem_of(&"x".repeat(49)),
            NameProblem::TooLong { len: 49 }
        );
    }

    #[test]
    fn capitals_dots_underscores_spaces_and_slashes_are_refused() {
        for (bad, ch, at) in [
            ("Web", 'W', 0),
            ("h0.rack2", '.', 2),
            (".hidden", '.', 0),
            ("x_y", '_', 1),
            ("a b", ' ', 1),
            ("a/b", '/', 1),
            ("né", 'é', 1),
        ] {
            assert_eq!(problem_of(bad), NameProblem::BadChar { ch, at }, "{bad}");
        }
    }

    #[test]
    fn a_leading_dash_is_refused() {
        assert_eq!(problem_of("-x"), NameProblem::LeadingDash);
        assert_eq!(problem_of("-"), NameProblem::LeadingDash);
    }

    #[test]
    fn the_error_names_the_kind_the_problem_and_the_rule() {
        let e = "Bad Name".parse::<HostName>().unwrap_err().to_string();
        assert_eq!(
            e,
            "host name \"Bad Name\" is invalid: it has 'B' at position 0, which is not \
             allowed; use 1-48 characters of a-z, 0-9 and '-', starting with a letter or digit"
        );
        let e = check(NameKind::Group, "").unwrap_err().to_string();
        assert!(
            e.starts_with("group name \"\" is invalid: it is empty;"),
            "{e}"
        );
    }

    #[test]
    fn serde_refuses_a_bad_name_and_writes_a_plain_string() {
        let v: VmName = serde_json::from_str(r#""web-1""#).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), r#""web-1""#);
        let e = serde_json::from_str::<VmName>(r#""Web""#).unwrap_err();
        assert!(e.to_string().contains("VM name \"Web\" is invalid"), "{e}");
    }

    #[test]
    fn maps_keyed_by_names_are_looked_up_with_str() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(HostName::from_str("h1").unwrap(), 1);
        assert_eq!(m.get("h1"), Some(&1));
        assert!(HostName::from_str("h1").unwrap() == "h1");
    }

    /// The rule written a second way, as a reader would state it, for the property test.
    fn follows_the_rule(s: &str) -> bool {
        let allowed = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-');
        match s.as_bytes() {
            [first, rest @ ..] => {
                *first != b'-'
                    && allowed(*first)
                    && rest.iter().all(|&b| allowed(b))
                    && s.len() <= MAX_NAME_LEN
            }
            [] => false,
        }
    }

    proptest! {
        #[test]
        fn the_parser_accepts_exactly_what_the_rule_describes(
            s in "[a-z0-9A._-]{0,52}"
        ) {
            let parsed = s.parse::<VmName>();
            prop_assert_eq!(parsed.is_ok(), follows_the_rule(&s), "{:?}: {:?}", s, parsed);
            prop_assert_eq!(s.parse::<HostName>().is_ok(), parsed.is_ok());
        }

        #[test]
        fn every_name_the_rule_describes_is_accepted(s in "[a-z0-9][a-z0-9-]{0,47}") {
            prop_assert!(follows_the_rule(&s));
            let v: VmName = s.parse().unwrap();
            let back: VmName = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
            prop_assert_eq!(back, v);
        }

        #[test]
        fn any_string_is_judged_without_panicking(s in any::<String>()) {
            let _ = s.parse::<VmName>();
        }
    }
}
