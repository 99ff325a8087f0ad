//! Variables in compose values: `${VAR}`, `$VAR`, `${VAR:-default}`, `${VAR-default}`,
//! `${VAR:?message}`, `${VAR?message}`, `${VAR:+alt}`, `${VAR+alt}` and `$$` for a literal `$`,
//! as docker compose expands them, and the `KEY=value` lines of `.env` and `env_file` files.

use super::Parsed;
use std::collections::BTreeMap;

use yaml_serde::Value;

use super::Cx;
use crate::containers::error::ContainerError;

/// Where variables come from: the map passed in (treated as the shell environment, so it wins),
/// then the release's `.env` file.
pub(super) struct Vars<'a> {
    pub(super) shell: &'a BTreeMap<String, String>,
    pub(super) dotenv: BTreeMap<String, String>,
}

impl Vars<'_> {
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.shell
            .get(name)
            .or_else(|| self.dotenv.get(name))
            .map(String::as_str)
    }
}

/// Interpolate every string value (keys are left alone, as compose does).
pub(super) fn interpolate_value(cx: &Cx, v: &Value, vars: &Vars) -> Parsed<Value> {
    Ok(match v {
        Value::String(s) => Value::String(interpolate(cx, s, vars)?),
        Value::Sequence(items) => Value::Sequence(
            items
                .iter()
                .map(|i| interpolate_value(cx, i, vars))
                .collect::<Result<_, _>>()?,
        ),
        Value::Mapping(m) => {
            let mut out = yaml_serde::Mapping::new();
            for (k, val) in m {
                out.insert(k.clone(), interpolate_value(cx, val, vars)?);
            }
            Value::Mapping(out)
        }
        Value::Tagged(t) => interpolate_value(cx, &t.value, vars)?,
        other => other.clone(),
    })
}

/// Interpolate one string.
fn interpolate(cx: &Cx, s: &str, vars: &Vars) -> Parsed<String> {
    let err = |message: &str| ContainerError::Interpolation {
        path: cx.path.clone(),
        expression: s.to_string(),
        message: message.to_string(),
    };
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                // Find the matching brace, allowing nested `${...}` in defaults.
                let mut depth = 1;
                let mut j = i + 2;
                while j < chars.len() && depth > 0 {
                    match chars[j] {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    j += 1;
                }
                if depth != 0 {
                    return Err(err("unterminated `${`"));
                }
                let inner: String = chars[i + 2..j - 1].iter().collect();
                out.push_str(&expand_braced(cx, &inner, vars, &err)?);
                i = j;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                out.push_str(&lookup(vars, &name));
                i = j;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The value of a variable; an empty string, with a warning, when it is not set.
fn lookup(vars: &Vars, name: &str) -> String {
    match vars.get(name) {
        Some(v) => v.to_string(),
        None => {
            tracing::warn!(
                variable = name,
                "compose variable is not set, using an empty string"
            );
            String::new()
        }
    }
}

/// The inside of `${...}`: a name and an optional modifier (`:-`, `-`, `:?`, `?`, `:+`, `+`)
/// with its word, itself interpolated.
fn expand_braced(
    cx: &Cx,
    inner: &str,
    vars: &Vars,
    err: &dyn Fn(&str) -> ContainerError,
) -> Parsed<String> {
    let name_len = inner
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
        .map_or(inner.len(), |(i, _)| i);
    let name = &inner[..name_len];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(err("invalid variable name"));
    }
    let rest = &inner[name_len..];
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let (op, word) = if let Some(w) = rest.strip_prefix(":-") {
        (":-", w)
    } else if let Some(w) = rest.strip_prefix(":?") {
        (":?", w)
    } else if let Some(w) = rest.strip_prefix(":+") {
        (":+", w)
    } else if let Some(w) = rest.strip_prefix('-') {
        ("-", w)
    } else if let Some(w) = rest.strip_prefix('?') {
        ("?", w)
    } else if let Some(w) = rest.strip_prefix('+') {
        ("+", w)
    } else if rest.is_empty() {
        ("", "")
    } else {
        return Err(err("unsupported modifier"));
    };
    let word = || interpolate(cx, word, vars);
    Ok(match op {
        "" => lookup(vars, name),
        ":-" if !set_nonempty => word()?,
        "-" if value.is_none() => word()?,
        ":?" if !set_nonempty => {
            return Err(err(&format!("{name} is required: {}", word()?)));
        }
        "?" if value.is_none() => {
            return Err(err(&format!("{name} is required: {}", word()?)));
        }
        ":+" => {
            if set_nonempty {
                word()?
            } else {
                String::new()
            }
        }
        "+" => {
            if value.is_some() {
                word()?
            } else {
                String::new()
            }
        }
        _ => value.unwrap_or_default().to_string(),
    })
}

/// Parse `KEY=value` lines (`.env`, `env_file`): comments, blank lines, `export`, quotes.
pub(super) fn parse_env_lines(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let value = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
            v[1..v.len() - 1]
                .replace("\\n", "\n")
                .replace("\\\"", "\"")
                .replace("\\\\", "\\")
        } else if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
            v[1..v.len() - 1].to_string()
        } else {
            match v.find(" #") {
                Some(i) => v[..i].trim_end().to_string(),
                None => v.to_string(),
            }
        };
        out.insert(k.trim().to_string(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn env_lines() {
        let m = parse_env_lines("# c\nA=1\nexport B=\"x y\"\nC='z' \nD=v # comment\n\nbad\n");
        assert_eq!(m.get("A").map(String::as_str), Some("1"));
        assert_eq!(m.get("B").map(String::as_str), Some("x y"));
        assert_eq!(m.get("C").map(String::as_str), Some("z"));
        assert_eq!(m.get("D").map(String::as_str), Some("v"));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn interpolation_forms() {
        let shell: BTreeMap<String, String> = [
            ("A".to_string(), "shell".to_string()),
            ("E".to_string(), String::new()),
        ]
        .into();
        let dotenv: BTreeMap<String, String> = [
            ("A".to_string(), "dotenv".to_string()),
            ("B".to_string(), "b".to_string()),
        ]
        .into();
        let vars = Vars {
            shell: &shell,
            dotenv,
        };
        let cx = Cx::test();
        let i = |s: &str| interpolate(&cx, s, &vars).unwrap();
        assert_eq!(i("${A}-$B-$$A"), "shell-b-$A");
        assert_eq!(i("${E:-d}|${E-d}|${U-d}|${U:-${B}}"), "d||d|b");
        assert_eq!(i("${B:+alt}|${U:+alt}|${E+set}"), "alt||set");
        assert!(interpolate(&cx, "${U:?needed}", &vars).is_err());
        assert!(interpolate(&cx, "${A", &vars).is_err());
    }
}
