//! The JSON Schema in `schemas/` and the native decoder agree on every example.

use revsync::event::decode_native_record;
use serde_json::Value;

#[test]
fn decoder_and_schema_agree_on_valid_and_invalid_examples() {
    let schema: Value =
        serde_json::from_str(include_str!("../schemas/revocation-event.v1.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let examples = include_str!("data/native-events.jsonl");
    let (mut valid, mut invalid) = (0, 0);
    for (i, line) in examples.lines().enumerate() {
        let case: Value = serde_json::from_str(line).unwrap();
        let event = &case["event"];
        let expected = case["valid"].as_bool().unwrap();
        let by_schema = validator.is_valid(event);
        let by_decoder = decode_native_record(event.to_string().as_bytes());
        assert_eq!(
            by_schema,
            expected,
            "line {}: schema says {by_schema} for {event}",
            i + 1
        );
        assert_eq!(
            by_decoder.is_ok(),
            expected,
            "line {}: decoder says {by_decoder:?} for {event}",
            i + 1
        );
        if expected {
            valid += 1
        } else {
            invalid += 1
        }
    }
    assert!(valid >= 8 && invalid >= 15, "examples cover both sides");
}
