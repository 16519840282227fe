//! Property: any generated cluster survives `serialize` then `parse` unchanged.

use proptest::prelude::*;
use tern_model::{ganeti, generate};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn serialize_then_parse_is_identity(
        seed in any::<u64>(),
        groups in 1usize..4,
        nodes in 0usize..30,
        instances in 0usize..120,
        tagged in any::<bool>(),
    ) {
        let c = generate::cluster(seed, generate::Shape { groups, nodes, instances, tagged });
        let text = ganeti::serialize(&c);
        let back = ganeti::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(back, c);
    }
}
