//! The JSON Schema in `schemas/` and the native decoder agree on every example. The schema
//! is what publishers must send; the decoder also takes an event whose only faults are
//! unusable optional fields (ignoring them, so the revocation is not lost), and must name
//! exactly those fields: an example the schema rejects is either malformed for the
//! decoder too, or decoded with the fields listed under `ignored` in the example.

use revsync::event::{decode_native_record_noting, Ignored};
use serde_json::Value;

#[test]
fn decoder_and_schema_agree_on_valid_and_invalid_examples() {
    let schema: Value =
        serde_json::from_str(include_str!("../schemas/revocation-event.v1.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let examples = include_str!("data/native-events.jsonl");
    let (mut valid, mut invalid, mut lenient) = (0, 0, 0);
    for (i, line) in examples.lines().enumerate() {
        let case: Value = serde_json::from_str(line).unwrap();
        let event = &case["event"];
        let expected = case["valid"].as_bool().unwrap();
        let want_ignored: Option<Vec<&str>> = case.get("ignored").map(|list| {
            list.as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap())
                .collect()
        });
        let by_schema = validator.is_valid(event);
        let mut ignored = Ignored::new();
        let by_decoder = decode_native_record_noting(event.to_string().as_bytes(), &mut ignored);
        assert_eq!(
            by_schema,
            expected,
            "line {}: schema says {by_schema} for {event}",
            i + 1
        );
        match &want_ignored {
            None => {
                assert_eq!(
                    by_decoder.is_ok(),
                    expected,
                    "line {}: decoder says {by_decoder:?} for {event}",
                    i + 1
                );
                assert!(ignored.is_empty(), "line {}: ignored {ignored:?}", i + 1);
            }
            Some(fields) => {
                assert!(
                    !expected,
                    "line {}: only invalid examples ignore fields",
                    i + 1
                );
                assert!(
                    by_decoder.is_ok(),
                    "line {}: decoder says {by_decoder:?} for {event}",
                    i + 1
                );
                assert_eq!(&ignored, fields, "line {}: ignored fields", i + 1);
            }
        }
        match (expected, want_ignored.is_some()) {
            (true, _) => valid += 1,
            (false, false) => invalid += 1,
            (false, true) => lenient += 1,
        }
    }
    assert!(
        valid >= 8 && invalid >= 15 && lenient >= 5,
        "examples cover every side"
    );
}
