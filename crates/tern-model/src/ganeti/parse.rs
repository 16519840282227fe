//! Reading the text format. Each function mirrors the Ganeti loader of the
//! same section, so that a file Ganeti accepts loads the same way here and a
//! file it rejects is rejected here.

use std::collections::HashMap;

use crate::{
    AllocPolicy, Cluster, Demand, DiskTemplate, DynUtil, Error, Group, GroupId, IPolicy, ISpec,
    Instance, InstanceStatus, MinMaxISpecs, Node, NodeId,
};

/// One line of the file with its 1-based number.
#[derive(Clone, Copy)]
struct Line<'a> {
    number: usize,
    text: &'a str,
}

impl Line<'_> {
    fn error(&self, what: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Line {
            line: self.number,
            what: what.into(),
            message: message.into(),
        }
    }
}

/// Ganeti's `sepSplit`: like `split`, but an empty input has no pieces.
fn sep_split(s: &str, sep: char) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(sep).collect()
    }
}

/// Comma-separated list (tags, networks, templates); empty means none.
fn comma_list(s: &str) -> Vec<String> {
    sep_split(s, ',').into_iter().map(str::to_owned).collect()
}

/// Haskell's `lines`: a final newline does not start another line. Lines keep
/// a trailing `\r`, as Ganeti's do.
fn lines(text: &str) -> Vec<Line<'_>> {
    let body = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() {
        return Vec::new();
    }
    body.split('\n')
        .enumerate()
        .map(|(i, text)| Line {
            number: i + 1,
            text,
        })
        .collect()
}

/// Splits lines into sections at empty lines (Ganeti's `sepSplit ""`).
fn sections<'a>(lines: &[Line<'a>]) -> Vec<Vec<Line<'a>>> {
    if lines.is_empty() {
        return Vec::new();
    }
    lines
        .split(|l| l.text.is_empty())
        .map(<[Line<'a>]>::to_vec)
        .collect()
}

/// Whether `s` reads as a Haskell `Int`: optional leading spaces, optional
/// `-`, then decimal digits or `0x`/`0o` followed by hex or octal digits.
fn read_int(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let (negative, body) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let (radix, digits) = match body.get(..2) {
        Some("0x" | "0X") => (16, &body[2..]),
        Some("0o" | "0O") => (8, &body[2..]),
        _ => (10, body),
    };
    if digits.is_empty() || !digits.chars().all(|ch| ch.is_digit(radix)) {
        return None;
    }
    let magnitude = i64::from_str_radix(digits, radix).ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// Whether `s` reads as a Haskell `Double`: like `Int`, plus an optional
/// fraction (`.` followed by digits) and exponent.
fn read_double(s: &str) -> Option<f64> {
    let t = s.trim_start();
    let body = t.strip_prefix('-').unwrap_or(t);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int_part, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    let ok = all_digits(int_part)
        && frac.is_none_or(all_digits)
        && exponent.is_none_or(|e| all_digits(e.strip_prefix(['-', '+']).unwrap_or(e)));
    if ok {
        t.parse().ok()
    } else {
        None
    }
}

/// Reads numeric fields of one object, naming the object and field on error.
struct Fields<'l, 'a> {
    line: &'l Line<'a>,
    what: String,
}

impl Fields<'_, '_> {
    fn err(&self, field: &str, message: String) -> Error {
        self.line
            .error(self.what.clone(), format!("field {field}: {message}"))
    }

    fn int(&self, field: &str, value: &str) -> Result<i64, Error> {
        read_int(value)
            .ok_or_else(|| self.err(field, format!("expected an integer, got {value:?}")))
    }

    fn double(&self, field: &str, value: &str) -> Result<f64, Error> {
        let v = read_double(value)
            .ok_or_else(|| self.err(field, format!("expected a number, got {value:?}")))?;
        // A ratio or utilisation too large for a double would read as infinity, which
        // no score can use and which cannot be written back in this format.
        if v.is_finite() {
            Ok(v)
        } else {
            Err(self.err(
                field,
                format!("{value:?} is too large for a double; give a finite number"),
            ))
        }
    }

    fn yes_no(&self, field: &str, value: &str) -> Result<bool, Error> {
        match value {
            "Y" => Ok(true),
            "N" => Ok(false),
            _ => Err(self.err(field, format!("expected Y or N, got {value:?}"))),
        }
    }

    fn choice<T: Copy>(
        &self,
        field: &str,
        value: &str,
        all: &[T],
        name: impl Fn(T) -> &'static str,
    ) -> Result<T, Error> {
        all.iter()
            .copied()
            .find(|&v| name(v) == value)
            .ok_or_else(|| {
                let names: Vec<_> = all.iter().map(|&v| name(v)).collect();
                self.err(
                    field,
                    format!("expected one of {}, got {value:?}", names.join(", ")),
                )
            })
    }
}

/// Fills missing trailing fields with Ganeti's defaults; `required` is the
/// fewest fields Ganeti accepts.
fn with_defaults<'a>(
    fields: Vec<&'a str>,
    required: usize,
    defaults: &[&'a str],
    line: &Line<'_>,
    what: &str,
) -> Result<Vec<&'a str>, Error> {
    let full = required + defaults.len();
    if fields.len() < required {
        return Err(line.error(
            what,
            format!(
                "has {} fields, needs at least {required} (up to {full}), separated by '|'",
                fields.len()
            ),
        ));
    }
    let mut fields = fields;
    let missing = full.saturating_sub(fields.len());
    fields.extend_from_slice(&defaults[defaults.len() - missing..]);
    Ok(fields)
}

fn name_of(kind: &str, fields: &[&str]) -> String {
    match fields.first() {
        Some(name) => format!("{kind} {name:?}"),
        None => kind.to_owned(),
    }
}

fn parse_group(line: &Line<'_>) -> Result<Group, Error> {
    let what = name_of("group", &sep_split(line.text, '|'));
    let f = with_defaults(sep_split(line.text, '|'), 4, &[""], line, &what)?;
    let fields = Fields { line, what };
    Ok(Group {
        name: f[0].to_owned(),
        uuid: f[1].to_owned(),
        alloc_policy: fields.choice(
            "alloc_policy",
            f[2],
            &AllocPolicy::ALL,
            AllocPolicy::as_str,
        )?,
        tags: comma_list(f[3]),
        networks: comma_list(f[4]),
        ipolicy: IPolicy::default(),
    })
}

fn parse_node(line: &Line<'_>, groups: &HashMap<&str, GroupId>) -> Result<Node, Error> {
    let what = name_of("node", &sep_split(line.text, '|'));
    let f = with_defaults(
        sep_split(line.text, '|'),
        9,
        &["1", "", "N", "0", "1", "1.0"],
        line,
        &what,
    )?;
    let fields = Fields { line, what };
    let group = *groups.get(f[8]).ok_or_else(|| {
        fields.err(
            "group_uuid",
            format!("no group with uuid {:?} in the groups section", f[8]),
        )
    })?;
    if f[1..=6].contains(&"?") {
        // Ganeti loads a node with unknown resources as offline and empty.
        return Ok(Node {
            name: f[0].to_owned(),
            total_mem: 0.0,
            node_mem: 0,
            free_mem: 0,
            total_disk: 0.0,
            free_disk: 0,
            pcpus: 0.0,
            offline: true,
            master: false,
            group,
            spindles: 0,
            tags: Vec::new(),
            exclusive_storage: false,
            free_spindles: 0,
            os_cpus: 0,
            cpu_speed: 1.0,
            cpu_capacity: None,
        });
    }
    Ok(Node {
        name: f[0].to_owned(),
        total_mem: fields.double("t_mem", f[1])?,
        node_mem: fields.int("n_mem", f[2])?,
        free_mem: fields.int("f_mem", f[3])?,
        total_disk: fields.double("t_disk", f[4])?,
        free_disk: fields.int("f_disk", f[5])?,
        pcpus: fields.double("pcpus", f[6])?,
        // Ganeti reads only `Y` and `M`; anything else is an online node.
        offline: f[7] == "Y",
        master: f[7] == "M",
        group,
        spindles: fields.int("spindles", f[9])?,
        tags: comma_list(f[10]),
        exclusive_storage: fields.yes_no("excl_stor", f[11])?,
        free_spindles: fields.int("free_spindles", f[12])?,
        os_cpus: fields.int("os_cpus", f[13])?,
        cpu_speed: fields.double("cpu_speed", f[14])?,
        cpu_capacity: None,
    })
}

fn parse_instance(line: &Line<'_>, nodes: &HashMap<&str, NodeId>) -> Result<Instance, Error> {
    let what = name_of("instance", &sep_split(line.text, '|'));
    let f = with_defaults(sep_split(line.text, '|'), 10, &["1", "-", "N"], line, &what)?;
    let fields = Fields { line, what };
    let node = |field: &str, name: &str| {
        nodes.get(name).copied().ok_or_else(|| {
            fields.err(
                field,
                format!("no node named {name:?} in the nodes section"),
            )
        })
    };
    let primary = node("pnode", f[6])?;
    let secondary = if f[7].is_empty() {
        None
    } else {
        Some(node("snode", f[7])?)
    };
    let inst = Instance {
        name: f[0].to_owned(),
        mem: fields.int("mem", f[1])?,
        disk: fields.int("disk", f[2])?,
        vcpus: fields.int("vcpus", f[3])?,
        status: fields.choice("status", f[4], &InstanceStatus::ALL, InstanceStatus::as_str)?,
        auto_balance: fields.yes_no("auto_balance", f[5])?,
        primary,
        secondary,
        disk_template: fields.choice(
            "disk_template",
            f[8],
            &DiskTemplate::ALL,
            DiskTemplate::as_str,
        )?,
        tags: comma_list(f[9]),
        spindle_use: fields.int("spindle_use", f[10])?,
        spindles: match f[11] {
            "-" => None,
            s => Some(fields.int("spindles", s)?),
        },
        forthcoming: fields.yes_no("forthcoming", f[12])?,
        util: DynUtil::BASE,
        demand: Demand::default(),
    };
    if inst.secondary == Some(primary) {
        return Err(fields.err(
            "snode",
            format!("secondary node {:?} is also the primary", f[7]),
        ));
    }
    Ok(inst)
}

fn parse_ispec(fields: &Fields<'_, '_>, field: &str, text: &str) -> Result<ISpec, Error> {
    let v = sep_split(text, ',');
    if v.len() < 6 {
        return Err(fields.err(
            field,
            format!("expected 6 comma-separated integers (mem,cpus,disk,disks,nics,spindles), got {text:?}"),
        ));
    }
    let int = |i: usize, part: &str| fields.int(&format!("{field}/{part}"), v[i]);
    Ok(ISpec {
        mem_size: int(0, "memsize")?,
        cpu_count: int(1, "cpucount")?,
        disk_size: int(2, "disksize")?,
        disk_count: int(3, "diskcount")?,
        nic_count: int(4, "niccount")?,
        spindle_use: int(5, "spindleuse")?,
    })
}

/// Returns the owner (empty for the cluster) and the policy.
fn parse_ipolicy(line: &Line<'_>) -> Result<(String, IPolicy), Error> {
    let f = sep_split(line.text, '|');
    let what = match f.first() {
        Some(&"") | None => "cluster policy".to_owned(),
        Some(owner) => format!("policy of group {owner:?}"),
    };
    if f.len() < 6 {
        return Err(line.error(
            what,
            format!(
                "has {} fields, needs 6 (owner|std|minmax|templates|vcpu_ratio|spindle_ratio)",
                f.len()
            ),
        ));
    }
    let fields = Fields { line, what };
    let specs = sep_split(f[2], ';');
    if !specs.len().is_multiple_of(2) {
        return Err(fields.err(
            "minmax",
            format!(
                "odd number of min/max specs ({}); they come in pairs",
                specs.len()
            ),
        ));
    }
    let min_max = specs
        .chunks(2)
        .map(|pair| {
            Ok(MinMaxISpecs {
                min: parse_ispec(&fields, "minspec", pair[0])?,
                max: parse_ispec(&fields, "maxspec", pair[1])?,
            })
        })
        .collect::<Result<_, Error>>()?;
    let disk_templates = sep_split(f[3], ',')
        .into_iter()
        .map(|t| {
            fields.choice(
                "disk_templates",
                t,
                &DiskTemplate::ALL,
                DiskTemplate::as_str,
            )
        })
        .collect::<Result<_, Error>>()?;
    Ok((
        f[0].to_owned(),
        IPolicy {
            min_max,
            std: parse_ispec(&fields, "stdspec", f[1])?,
            disk_templates,
            vcpu_ratio: fields.double("vcpu_ratio", f[4])?,
            spindle_ratio: fields.double("spindle_ratio", f[5])?,
        },
    ))
}

/// Parses a Ganeti htools text file.
pub fn parse(text: &str) -> Result<Cluster, Error> {
    let all = lines(text);
    let sections = sections(&all);
    if sections.len() < 4 {
        return Err(Error::Format(format!(
            "a Ganeti text file has at least 4 sections (groups, nodes, instances, \
             cluster tags) separated by empty lines; this one has {}",
            sections.len()
        )));
    }
    let groups = sections[0]
        .iter()
        .map(parse_group)
        .collect::<Result<Vec<_>, _>>()?;
    // Group policies name their group, so a second group of one name could never be
    // given its own policy, nor be written back and read again.
    for (i, line) in sections[0].iter().enumerate() {
        if groups[..i].iter().any(|g| g.name == groups[i].name) {
            return Err(line.error(
                format!("group {:?}", groups[i].name),
                "an earlier group has the same name; give each group its own name",
            ));
        }
    }
    // Later entries win on duplicate keys, as in Ganeti's `M.fromList`.
    let group_ids: HashMap<&str, GroupId> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| (g.uuid.as_str(), GroupId::from_index(i)))
        .collect();
    let nodes = sections[1]
        .iter()
        .map(|l| parse_node(l, &group_ids))
        .collect::<Result<Vec<_>, _>>()?;
    let node_ids: HashMap<&str, NodeId> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), NodeId::from_index(i)))
        .collect();
    let instances = sections[2]
        .iter()
        .map(|l| parse_instance(l, &node_ids))
        .collect::<Result<Vec<_>, _>>()?;
    let tags = sections[3].iter().map(|l| l.text.to_owned()).collect();
    let mut cluster = Cluster {
        groups,
        nodes,
        instances,
        tags,
        ipolicy: IPolicy::default(),
    };
    for line in sections.get(4).map(Vec::as_slice).unwrap_or_default() {
        let (owner, policy) = parse_ipolicy(line)?;
        if owner.is_empty() {
            cluster.ipolicy = policy;
            continue;
        }
        let matching: Vec<usize> = (0..cluster.groups.len())
            .filter(|&i| cluster.groups[i].name == owner)
            .collect();
        match matching.as_slice() {
            [i] => cluster.groups[*i].ipolicy = policy,
            _ => {
                return Err(line.error(
                    format!("policy of group {owner:?}"),
                    format!(
                        "{} groups have that name; a group policy names exactly one group",
                        matching.len()
                    ),
                ))
            }
        }
    }
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_haskell_reads_them() {
        assert_eq!(read_int("42"), Some(42));
        assert_eq!(read_int(" -7"), Some(-7));
        assert_eq!(read_int("7 "), None);
        assert_eq!(read_int("1.0"), None);
        assert_eq!(read_int(""), None);
        assert_eq!(read_int("0x10"), Some(16));
        assert_eq!(read_int("-0o17"), Some(-15));
        assert_eq!(read_int("0xg"), None);
        assert_eq!(read_double("1"), Some(1.0));
        assert_eq!(read_double("2.5e3"), Some(2500.0));
        assert_eq!(read_double(".5"), None);
        assert_eq!(read_double("1."), None);
        assert_eq!(read_double("abc"), None);
    }

    #[test]
    fn sections_split_like_ganeti() {
        let l = lines("a\n\nb\n\n\nc\n");
        let s = sections(&l);
        let texts: Vec<Vec<&str>> = s
            .iter()
            .map(|s| s.iter().map(|l| l.text).collect())
            .collect();
        assert_eq!(texts, vec![vec!["a"], vec!["b"], vec![], vec!["c"]]);
        assert!(sections(&lines("")).is_empty());
    }

    #[test]
    fn bad_number_names_line_node_and_field() {
        let text = "g|u1|preferred||\n\nnode-03|abc|0|0|0|0|1|N|u1\n\n\n";
        let err = parse(text).unwrap_err().to_string();
        assert_eq!(
            err,
            "line 3, node \"node-03\": field t_mem: expected a number, got \"abc\""
        );
    }

    #[test]
    fn question_mark_node_is_offline_and_empty() {
        let text = "g|u1|preferred||\n\nn1|?|0|0|10|10|4|N|u1|3|t1\n\n\n";
        let c = parse(text).unwrap();
        assert!(c.nodes[0].offline);
        assert_eq!(c.nodes[0].total_mem, 0.0);
        assert!(c.nodes[0].tags.is_empty());
    }

    #[test]
    fn optional_fields_take_ganeti_defaults() {
        let text = "g|u1|preferred|t\n\nn1|100|1|50|10|10|4|M|u1\n\n\
                    i1|10|1|1|running|Y|n1||plain|\n\n";
        let c = parse(text).unwrap();
        let n = &c.nodes[0];
        assert!(n.master && !n.offline);
        assert_eq!((n.spindles, n.free_spindles, n.os_cpus), (1, 0, 1));
        assert_eq!(n.cpu_speed, 1.0);
        let i = &c.instances[0];
        assert_eq!((i.spindle_use, i.spindles, i.forthcoming), (1, None, false));
        assert!(c.groups[0].networks.is_empty());
        assert_eq!(c.groups[0].tags, vec!["t".to_owned()]);
    }

    #[test]
    fn too_few_sections_is_rejected() {
        assert!(matches!(
            parse("g|u|preferred||\n\n"),
            Err(Error::Format(_))
        ));
    }
}
