//! Small hand-made files at the edges of the format, each with the outcome
//! Ganeti 3.0.2's `hinfo -t FILE` gives it (checked by running hinfo on each):
//! loaded, or rejected for the reason in the comment. tern must agree.

use tern_model::ganeti;

const G: &str = "g|u|preferred||";
const A: &str = "a|1024|0|1024|1000|1000|4|N|u|1";
const B: &str = "b|1024|0|1024|1000|1000|4|N|u|1";
const POLICY_TAIL: &str = "|1,1,1,1,1,1;2,2,2,2,2,2|ext|4.0|32.0";

/// `Ok(())` if hinfo loads the file, `Err(part of tern's message)` if it rejects it.
fn cases() -> Vec<(&'static str, String, Result<(), &'static str>)> {
    vec![
        // "Invalid ispec data for /stdspec"
        (
            "short ispec",
            format!("{G}\n\n{A}\n\n\n\n|1,1,1,1,1{POLICY_TAIL}\n"),
            Err("cluster policy: field stdspec: expected 6 comma-separated"),
        ),
        // "Odd number of min/max specs"
        (
            "odd min/max",
            format!("{G}\n\n{A}\n\n\n\n|1,1,1,1,1,1|1,1,1,1,1,1|ext|4.0|32.0\n"),
            Err("field minmax: odd number"),
        ),
        // "Wrong number of elems found with name zz"
        (
            "policy for unknown group",
            format!("{G}\n\n{A}\n\n\n\nzz|1,1,1,1,1,1{POLICY_TAIL}\n"),
            Err("line 7, policy of group \"zz\": 0 groups have that name"),
        ),
        // "Instance i has same primary and secondary node - a"
        (
            "secondary equals primary",
            format!("{G}\n\n{A}\n{B}\n\ni|128|10|1|running|Y|a|a|drbd||1\n\n\n"),
            Err("line 6, instance \"i\": field snode"),
        ),
        (
            "plain with a secondary",
            format!("{G}\n\n{A}\n{B}\n\ni|128|10|1|running|Y|a|b|plain||1\n\n\n"),
            Ok(()),
        ),
        // "Invalid string value for type InstanceStatus"
        (
            "unknown status",
            format!("{G}\n\n{A}\n\ni|128|10|1|runnin|Y|a||ext||1\n\n\n"),
            Err("field status: expected one of"),
        ),
        // "Invalid/incomplete instance data"
        (
            "instance with 9 fields",
            format!("{G}\n\n{A}\n\ni|128|10|1|running|Y|a||ext\n\n\n"),
            Err("instance \"i\": has 9 fields, needs at least 10"),
        ),
        (
            "unknown offline flag means online",
            format!("{G}\n\na|1024|0|1024|1000|1000|4|X|u|1\n\n\n\n"),
            Ok(()),
        ),
        (
            "negative memory",
            format!("{G}\n\na|-5|0|1024|1000|1000|4|N|u|1\n\n\n\n"),
            Ok(()),
        ),
        (
            "leading space in a number",
            format!("{G}\n\na| 1024|0|1024|1000|1000|4|N|u|1\n\n\n\n"),
            Ok(()),
        ),
        // "leftover characters when parsing '1024 '"
        (
            "trailing space in a number",
            format!("{G}\n\na|1024 |0|1024|1000|1000|4|N|u|1\n\n\n\n"),
            Err("field t_mem: expected a number, got \"1024 \""),
        ),
        // "cannot parse string '0.0'"
        (
            "fraction in an integer field",
            format!("{G}\n\na|1024|0.0|1024|1000|1000|4|N|u|1\n\n\n\n"),
            Err("field n_mem: expected an integer"),
        ),
        (
            "exponent in a float field",
            format!("{G}\n\na|1e3|0|1024|1000|1000|4|N|u|1\n\n\n\n"),
            Ok(()),
        ),
        (
            "hexadecimal integer",
            format!("{G}\n\na|1024|0x10|1024|1000|1000|4|N|u|1\n\n\n\n"),
            Ok(()),
        ),
        (
            "duplicate node names",
            format!("{G}\n\n{A}\n{A}\n\ni|128|10|1|running|Y|a||ext||1\n\n\n"),
            Ok(()),
        ),
        // "Invalid format of the input file: 3 sections instead of 4 or more"
        (
            "three sections",
            format!("{G}\n\n{A}\n\n"),
            Err("this one has 3"),
        ),
        // "Invalid exclusive_storage value for node 'a': X"
        (
            "bad exclusive storage",
            format!("{G}\n\na|1024|0|1024|1000|1000|4|N|u|1||X\n\n\n\n"),
            Err("field excl_stor: expected Y or N"),
        ),
        (
            "unknown resources skip other checks",
            format!("{G}\n\na|?|0|1024|1000|1000|4|N|u|1||X\n\n\n\n"),
            Ok(()),
        ),
        // "Unknown group 'zz' for node a"
        (
            "unknown group even with ?",
            format!("{G}\n\na|?|0|1024|1000|1000|4|N|zz|1\n\n\n\n"),
            Err("field group_uuid: no group with uuid \"zz\""),
        ),
        // "Invalid/incomplete group data"
        (
            "group with 3 fields",
            "g|u|preferred\n\n\n\n\n".to_owned(),
            Err("line 1, group \"g\": has 3 fields"),
        ),
        (
            "two groups share a uuid",
            format!("{G}\ng2|u|preferred||\n\n{A}\n\n\n\ng|1,1,1,1,1,1{POLICY_TAIL}\n"),
            Ok(()),
        ),
    ]
}

#[test]
fn edge_cases_load_or_fail_as_in_ganeti() {
    for (label, text, expected) in cases() {
        match (ganeti::parse(&text), expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(part)) => assert!(
                e.to_string().contains(part),
                "{label}: message {e:?} lacks {part:?}"
            ),
            (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
        }
    }
}
