//! Entry points shared by the fuzz targets in `fuzz/` (libFuzzer, run by hand) and by the
//! bounded fuzz smoke run inside `cargo test` (`smoke`): untrusted texts — policy text,
//! schema text, entity JSON — must be refused or accepted, never crash the process.

use crate::policy::{self, CompiledPolicies};
use std::time::{Duration, Instant};

/// Policy text through the same bounds and compiler as PutPolicies.
pub fn policy_text(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = policy::compile(1, text, "");
    }
}

/// Schema text, with a policy set to validate against it.
pub fn schema_text(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = policy::compile(1, "permit (principal, action, resource);", text);
    }
}

/// An entities file through the CLI's parser and the Cedar conversion of each entity.
pub fn entity_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(entities) = crate::entity_json::parse_entities(text) else { return };
    let policies = CompiledPolicies::empty();
    for e in &entities {
        let _ = policies.check_entity(e);
    }
}

/// Seeds for the smoke run's mutations.
const POLICY_SEED: &str = include_str!("../examples/property-rules/policies.cedar");
const SCHEMA_SEED: &str = include_str!("../examples/quickstart/schema.cedarschema");
const ENTITY_SEED: &str = include_str!("../examples/quickstart/entities.json");

/// Fragments the mutator inserts and repeats: the bracket and operator shapes that make
/// recursive parsers deep.
const DICTIONARY: &[&str] = &[
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    "<",
    ">",
    "\"",
    "\\",
    "&&",
    "||",
    "!",
    "-",
    ".",
    "if true then ",
    " else ",
    "Set<",
    "{ a: ",
    "[[",
    "{\"a\":",
    "__entity",
    "__extn",
    ":",
    ",",
    ";",
    "//",
    "\n",
    "has ",
    "like \"*\"",
    "\u{0}",
    "\u{feff}",
    "é",
];

/// A small deterministic generator (xorshift), so a failure is reproducible by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutant of `seed`: a few random edits, sometimes one fragment repeated hundreds or
/// thousands of times (deep nesting, long chains).
fn mutate(rng: &mut Rng, seed: &str) -> Vec<u8> {
    let mut out = seed.as_bytes().to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(out.len() + 1);
        match rng.below(5) {
            0 => {
                let end = (at + rng.below(64)).min(out.len());
                out.drain(at..end);
            }
            1 => out.insert(at, rng.next() as u8),
            2 => {
                let frag = DICTIONARY[rng.below(DICTIONARY.len())].as_bytes();
                let times = [1, 2, 40, 200, 1000, 5000][rng.below(6)];
                let block: Vec<u8> = frag.iter().copied().cycle().take(frag.len() * times).collect();
                out.splice(at..at, block);
            }
            3 => {
                let end = (at + rng.below(32)).min(out.len());
                let piece = out[at..end].to_vec();
                for _ in 0..rng.below(50) {
                    out.splice(at..at, piece.iter().copied());
                }
            }
            _ => {
                let frag = DICTIONARY[rng.below(DICTIONARY.len())].as_bytes();
                out.splice(at..at, frag.iter().copied());
            }
        }
    }
    out
}

/// Bracket pairs that nest: wrapped around a piece of text many times over they make the
/// deep inputs that overflow a recursive parser.
const NESTINGS: &[(&str, &str)] = &[
    ("(", ")"),
    ("[", "]"),
    ("{ a: ", " }"),
    ("Set<", ">"),
    ("if true then ", " else false"),
    ("!(", ")"),
    ("{\"a\": ", "}"),
    ("[", "]"),
];

/// A well-formed text whose core is nested `depth` deep with one of `NESTINGS`.
fn nested(rng: &mut Rng, which: usize) -> Vec<u8> {
    let (open, close) = NESTINGS[rng.below(NESTINGS.len())];
    let depth = [10, 40, 150, 400, 1000, 3000][rng.below(6)];
    let core = format!("{}{}{}", open.repeat(depth), ["true", "String", "1"][which], close.repeat(depth));
    let text = match which {
        0 => format!("permit (principal, action, resource) when {{ {core} }};"),
        1 => format!("entity A {{ a: {core} }};"),
        _ => format!("[{{ \"uid\": {{ \"type\": \"A\", \"id\": \"a\" }}, \"attrs\": {{ \"a\": {core} }} }}]"),
    };
    text.into_bytes()
}

/// Runs mutants of the examples through the three entry points for about `budget`, on a
/// thread with a server worker's 2 MiB stack (a stack overflow aborts the process: the
/// test fails). Returns how many inputs ran.
pub fn smoke(budget: Duration, seed: u64) -> usize {
    std::thread::Builder::new()
        .name("fuzz-smoke".into())
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            let mut rng = Rng(seed | 1);
            let start = Instant::now();
            let mut runs = 0;
            while start.elapsed() < budget {
                let which = rng.below(3);
                let input = if rng.below(4) == 0 {
                    nested(&mut rng, which)
                } else {
                    mutate(&mut rng, [POLICY_SEED, SCHEMA_SEED, ENTITY_SEED][which])
                };
                match which {
                    0 => policy_text(&input),
                    1 => schema_text(&input),
                    _ => entity_json(&input),
                }
                runs += 1;
            }
            runs
        })
        .map(|h| h.join().unwrap_or(0))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    /// The bounded fuzz smoke run: a few seconds of mutants of every untrusted text.
    #[test]
    fn fuzz_smoke_untrusted_texts() {
        let runs = super::smoke(std::time::Duration::from_secs(4), 0x5eed_1ab5);
        eprintln!("fuzz smoke: {runs} inputs (policy text, schema text, entity JSON), no crash");
        assert!(runs > 50, "{runs}");
    }
}
