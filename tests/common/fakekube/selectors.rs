//! Label and field selectors, with the grammar and semantics of
//! k8s.io/apimachinery/pkg/labels and pkg/fields: `=`, `==`, `!=`, `in`,
//! `notin`, exists, `!`exists, `>`/`<` for labels; `=`, `==`, `!=` on the
//! fields a resource supports for fields (anything else: 400 BadRequest).

use serde_json::Value;

use super::resources::{ApiError, Res};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    NotEq,
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

#[derive(Clone, Debug)]
struct Requirement {
    key: String,
    op: Op,
    value: String,
}

/// A parsed label selector; empty matches everything.
#[derive(Clone, Debug, Default)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
}

pub fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

pub fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix
        && (p.is_empty() || !super::resources::is_dns_subdomain(p))
    {
        return false;
    }
    !name.is_empty() && valid_label_value(name)
}

fn parse_err(sel: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unable to parse requirement: {why} (in label selector {sel:?})"
    ))
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }

    fn ident(&mut self) -> String {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() {
            let c = self.s[self.i];
            if c.is_ascii_whitespace()
                || matches!(c, b',' | b'=' | b'!' | b'(' | b')' | b'<' | b'>')
            {
                break;
            }
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.s[self.i..].starts_with(tok.as_bytes()) {
            self.i += tok.len();
            true
        } else {
            false
        }
    }
}

impl LabelSelector {
    pub fn parse(sel: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        let mut lx = Lexer {
            s: sel.as_bytes(),
            i: 0,
        };
        if lx.peek().is_none() {
            return Ok(Self { reqs });
        }
        loop {
            let negated = lx.eat("!");
            let key = lx.ident();
            if !valid_label_key(&key) {
                return Err(parse_err(sel, &format!("invalid label key {key:?}")));
            }
            let (op, value) = if negated {
                (Op::NotExists, String::new())
            } else if lx.eat("==") || lx.eat("=") {
                (Op::Eq, lx.ident())
            } else if lx.eat("!=") {
                (Op::NotEq, lx.ident())
            } else if lx.eat(">") || lx.eat("<") {
                let gt = lx.s[lx.i - 1] == b'>';
                let v = lx.ident();
                let n: i64 = v.parse().map_err(|_| {
                    parse_err(
                        sel,
                        &format!("for 'Gt', 'Lt' operators, the value must be an integer: {v:?}"),
                    )
                })?;
                (if gt { Op::Gt(n) } else { Op::Lt(n) }, String::new())
            } else {
                let save = lx.i;
                let word = lx.ident();
                match word.as_str() {
                    "in" | "notin" => {
                        if !lx.eat("(") {
                            return Err(parse_err(sel, "found '', expected: '('"));
                        }
                        let mut vals = Vec::new();
                        loop {
                            if lx.eat(")") {
                                break;
                            }
                            let v = lx.ident();
                            if !valid_label_value(&v) {
                                return Err(parse_err(sel, &format!("invalid label value: {v:?}")));
                            }
                            vals.push(v);
                            if lx.eat(",") {
                                continue;
                            }
                            if lx.eat(")") {
                                break;
                            }
                            return Err(parse_err(sel, "expected ',' or ')'"));
                        }
                        if vals.is_empty() {
                            return Err(parse_err(
                                sel,
                                "for 'in', 'notin' operators, values set can't be empty",
                            ));
                        }
                        (
                            if word == "in" {
                                Op::In(vals)
                            } else {
                                Op::NotIn(vals)
                            },
                            String::new(),
                        )
                    }
                    "" => {
                        lx.i = save;
                        (Op::Exists, String::new())
                    }
                    other => {
                        return Err(parse_err(
                            sel,
                            &format!("found '{other}', expected: in, notin, =, ==, !=, gt, lt"),
                        ));
                    }
                }
            };
            if matches!(op, Op::Eq | Op::NotEq) && !valid_label_value(&value) {
                return Err(parse_err(sel, &format!("invalid label value: {value:?}")));
            }
            reqs.push(Requirement { key, op, value });
            match lx.peek() {
                None => break,
                Some(b',') => {
                    lx.i += 1;
                }
                Some(c) => {
                    return Err(parse_err(
                        sel,
                        &format!("found '{}', expected: ',' or 'end of string'", c as char),
                    ));
                }
            }
        }
        Ok(Self { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|r| {
            let v = get(&r.key);
            match &r.op {
                Op::Eq => v == Some(r.value.as_str()),
                Op::NotEq => v != Some(r.value.as_str()),
                Op::In(vals) => v.is_some_and(|v| vals.iter().any(|x| x == v)),
                Op::NotIn(vals) => v.is_none_or(|v| !vals.iter().any(|x| x == v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|x| x > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|x| x < *n),
            }
        })
    }
}

/// A parsed field selector; empty matches everything.
#[derive(Clone, Debug, Default)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut esc = false;
    for c in s.chars() {
        if esc {
            cur.push('\\');
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if esc {
        cur.push('\\');
    }
    out.push(cur);
    out
}

fn unescape(s: &str) -> Result<String, ApiError> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                Some(e) => {
                    return Err(ApiError::bad_request(format!(
                        "invalid field selector: invalid escape sequence: \\{e}"
                    )));
                }
                None => {
                    return Err(ApiError::bad_request(
                        "invalid field selector: unterminated escape sequence",
                    ));
                }
            }
        } else if c == '=' || c == ',' {
            return Err(ApiError::bad_request(format!(
                "invalid field selector: unescaped {c:?} in value"
            )));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

impl FieldSelector {
    pub fn parse(res: Res, sel: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        if sel.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for part in split_unescaped(sel, ',') {
            let (field, neq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, false, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{sel}'; can't understand '{part}'"
                )));
            };
            let field = field.trim().to_string();
            let supported = field == "metadata.name"
                || (field == "metadata.namespace" && res.namespaced())
                || res.info().fields.contains(&field.as_str());
            if !supported {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push((field, neq, unescape(value)?));
        }
        Ok(Self { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// The name an exact `metadata.name=` requirement pins, if any.
    pub fn pinned_name(&self) -> Option<&str> {
        self.reqs
            .iter()
            .find(|(f, neq, _)| f == "metadata.name" && !neq)
            .map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs
            .iter()
            .all(|(f, neq, v)| (field_value(obj, f) == *v) != *neq)
    }
}

/// The string a field selector compares, with the registry's defaults.
pub fn field_value(obj: &Value, field: &str) -> String {
    // Events: `source` is source.component.
    let field = if field == "source" {
        "source.component"
    } else {
        field
    };
    let ptr = format!("/{}", field.replace('.', "/"));
    match obj.pointer(&ptr) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => match field {
            "spec.hostNetwork" | "spec.unschedulable" => "false".into(),
            _ => String::new(),
        },
    }
}
