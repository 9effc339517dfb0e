//! Audit records against their documented schema (docs/events.md).

use std::path::Path;

/// The record schema of docs/events.md: field → allowed JSON types, per section.
pub struct Schema {
    common: Vec<(String, Vec<String>)>,
    net: Vec<(String, Vec<String>)>,
    types: std::collections::HashMap<String, Vec<(String, Vec<String>)>>,
}

impl Schema {
    pub fn load() -> Self {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/events.md"),
        )
        .unwrap();
        let mut schema = Schema {
            common: Vec::new(),
            net: Vec::new(),
            types: Default::default(),
        };
        let mut section = String::new();
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("## ") {
                section = h.to_string();
            } else if let Some(h) = line.strip_prefix("### ") {
                section = h.trim_matches('`').to_string();
            } else if let Some(row) = line.strip_prefix("| `") {
                let row = row.replace("\\|", "/");
                let cols: Vec<&str> = row.split('|').map(str::trim).collect();
                let field = cols[0].trim_end_matches('`').to_string();
                let mut types: Vec<String> = cols[1].split('/').map(str::to_string).collect();
                // "… only: …" in the meaning marks a field that only some records have.
                if cols
                    .get(2)
                    .and_then(|m| m.split_once(':'))
                    .is_some_and(|(head, _)| head.ends_with(" only"))
                {
                    types.push("absent".into());
                }
                let target = match section.as_str() {
                    "Common fields" => &mut schema.common,
                    s if s.starts_with("Fields of kernel records") => &mut schema.net,
                    s => schema.types.entry(s.to_string()).or_default(),
                };
                target.push((field, types));
            }
        }
        assert!(
            schema.common.len() >= 4 && schema.types.len() >= 9,
            "docs/events.md did not parse"
        );
        schema
    }

    /// Panics with the reason if `record` does not follow the documented schema.
    pub fn check(&self, record: &serde_json::Value) {
        let obj = record
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {record}"));
        let ty = obj
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or_else(|| panic!("no type: {record}"));
        let specific = self
            .types
            .get(ty)
            .unwrap_or_else(|| panic!("undocumented type {ty}: {record}"));
        let mut required: Vec<&(String, Vec<String>)> = self.common.iter().collect();
        if ty.starts_with("net.") || ty.starts_with("proc.") {
            required.extend(self.net.iter());
        }
        for (field, types) in required.iter().copied().chain(specific.iter()) {
            match obj.get(field) {
                Some(v) => assert!(
                    types.iter().any(|t| json_type(v) == t),
                    "{ty}.{field} is {v}, documented as {types:?}: {record}"
                ),
                None => assert!(
                    types.iter().any(|t| t == "absent"),
                    "{ty} lacks {field}: {record}"
                ),
            }
        }
        for key in obj.keys() {
            let documented =
                required.iter().any(|(f, _)| f == key) || specific.iter().any(|(f, _)| f == key);
            assert!(documented, "{ty}.{key} is not in docs/events.md: {record}");
        }
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}
