//! Judging a step: what came back compared with what the step expects, and when they differ,
//! a sentence saying what was wrong, what came, and a hex dump of the first differing bytes.

use userblk::proto::Errno;

use super::pattern::{first_difference, Data};
use super::Expect;

/// What a step got back.
#[derive(Clone)]
pub(super) enum Actual {
    /// Success, with a READ's data (empty for other commands).
    Ok(Vec<u8>),
    /// An error reply.
    Errno(u32),
    /// The connection closed without a reply.
    Closed,
    /// Nothing was read (the step expected none and did not wait).
    Nothing,
    /// A reply the kernel would reject.
    Violation(String),
    /// The harness could not run the step.
    Failed(String),
}

/// How an outcome differs from the expectation.
pub(super) struct Mismatch {
    /// What was wrong, in words: the first line of the failure.
    pub summary: String,
    /// What came.
    pub actual: String,
    /// Hex dumps of the differing bytes.
    pub diff: Option<String>,
}

/// How a step's outcome is described: the read's offset, the seeds the script uses (to name
/// the data that came), the device's logical block size (for `any-of`).
pub(super) struct Context<'a> {
    pub offset: u64,
    pub seeds: &'a [u64],
    pub block_size: u64,
}

impl Context<'_> {
    fn describe(&self, a: &Actual) -> String {
        match a {
            Actual::Ok(d) if d.is_empty() => "ok".to_string(),
            Actual::Ok(d) => format!(
                "ok, data {}",
                Data::describe(d, self.offset, 512, self.seeds)
            ),
            Actual::Errno(e) => format!("error {}", Errno(*e)),
            Actual::Closed => "the connection closed without a reply".into(),
            Actual::Nothing => "nothing read".into(),
            Actual::Violation(v) => format!("protocol violation: {v}"),
            Actual::Failed(f) => format!("failed: {f}"),
        }
    }
}

/// Compares an outcome with the expectation.
pub(super) fn judge(expect: &Expect, actual: &Actual, cx: &Context<'_>) -> Result<(), Mismatch> {
    let mismatch = |summary: String, diff: Option<String>| Mismatch {
        summary,
        actual: cx.describe(actual),
        diff,
    };
    match (expect, actual) {
        (Expect::Ok, Actual::Ok(_)) | (Expect::Closed, Actual::Closed) => Ok(()),
        (Expect::Nothing, Actual::Nothing) => Ok(()),
        (Expect::Errno(e), Actual::Errno(a)) if e == a => Ok(()),
        (Expect::Data(d), Actual::Ok(bytes)) => match d.render(cx.offset, bytes.len()) {
            None => Err(mismatch(
                format!(
                    "the expected data `{d}` does not add up to the {} bytes returned",
                    bytes.len()
                ),
                None,
            )),
            Some((want, mask)) => {
                match first_difference(&want, bytes, mask.as_deref(), cx.offset) {
                    None => Ok(()),
                    Some(diff) => Err(mismatch(
                        "the data read differs from the expected data".into(),
                        Some(diff),
                    )),
                }
            }
        },
        (Expect::AnyOf(alts), Actual::Ok(bytes)) => {
            any_of(alts, bytes, cx).map_err(|(summary, diff)| mismatch(summary, diff))
        }
        (Expect::AnyOf(_), _) => Err(mismatch(
            format!("expected success, got {}", cx.describe(actual)),
            None,
        )),
        _ => Err(mismatch(
            format!("expected {expect}, got {}", cx.describe(actual)),
            None,
        )),
    }
}

/// Checks `bytes`, read at `cx.offset`, block by block against the alternatives: each logical
/// block (the part of it inside the read) must equal the same block of one of them. `Err` names
/// the first block that matched none, with a dump of how it differs from each alternative.
fn any_of(alts: &[Data], bytes: &[u8], cx: &Context<'_>) -> Result<(), (String, Option<String>)> {
    if alts.is_empty() {
        return Err(("`any-of` with no alternatives matches nothing".into(), None));
    }
    let mut rendered = Vec::with_capacity(alts.len());
    for d in alts {
        let r = d.render(cx.offset, bytes.len()).ok_or_else(|| {
            let n = bytes.len();
            (
                format!("the alternative `{d}` does not add up to the {n} bytes returned"),
                None,
            )
        })?;
        rendered.push(r);
    }
    let bs = cx.block_size.max(1);
    let mut at = 0usize;
    while at < bytes.len() {
        let abs = cx.offset + at as u64;
        // The block's end, or the read's when it ends first.
        let end = usize::try_from(bs - abs % bs)
            .map_or(bytes.len(), |n| at.saturating_add(n).min(bytes.len()));
        let counts = |mask: &Option<Vec<bool>>, i: usize| mask.as_ref().is_none_or(|m| m[i]);
        let block_matches = |(want, mask): &(Vec<u8>, Option<Vec<bool>>)| match mask {
            None => want[at..end] == bytes[at..end],
            Some(_) => (at..end).all(|i| !counts(mask, i) || want[i] == bytes[i]),
        };
        if !rendered.iter().any(block_matches) {
            let mut dumps = Vec::new();
            for ((want, mask), d) in rendered.iter().zip(alts) {
                // Only this block's bytes count: each dump shows where the block differs.
                let in_block: Vec<bool> = (0..bytes.len())
                    .map(|i| (at..end).contains(&i) && counts(mask, i))
                    .collect();
                if let Some(dump) = first_difference(want, bytes, Some(&in_block), cx.offset) {
                    dumps.push(format!("against `{d}`: {dump}"));
                }
            }
            let summary = format!(
                "block {} (device bytes {abs}..{}, {bs}-byte blocks) matches none of the {} \
                 alternatives: a torn write, or data from none of them",
                abs / bs,
                cx.offset + end as u64,
                alts.len(),
            );
            return Err((summary, Some(dumps.join("\n"))));
        }
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::Pattern;

    fn check(alts: &[Data], bytes: &[u8], offset: u64) -> Result<(), String> {
        let cx = Context {
            offset,
            seeds: &[1, 2],
            block_size: 512,
        };
        any_of(alts, bytes, &cx).map_err(|(s, d)| format!("{s}\n{}", d.unwrap_or_default()))
    }

    #[test]
    fn any_of_takes_each_block_from_any_alternative() {
        let one = Pattern::Seed(1).bytes(4096, 2048);
        let two = Pattern::Seed(2).bytes(4096, 2048);
        let alts = [Data::seed(1), Data::seed(2)];
        let mut mixed = one.clone();
        mixed[512..1024].copy_from_slice(&two[512..1024]);
        mixed[1536..].copy_from_slice(&two[1536..]);
        check(&alts, &mixed, 4096).unwrap();
        check(&alts, &two, 4096).unwrap();

        let mut torn = one.clone();
        torn[1024 + 256..1536].copy_from_slice(&two[1024 + 256..1536]);
        let err = check(&alts, &torn, 4096).unwrap_err();
        assert!(
            err.starts_with("block 10 (device bytes 5120..5632"),
            "{err}"
        );
        assert!(
            err.contains("against `seed:1`: first difference at byte 1280"),
            "{err}"
        );
        assert!(
            err.contains("against `seed:2`: first difference at byte 1024"),
            "{err}"
        );
    }

    #[test]
    fn any_of_checks_partial_blocks_and_any() {
        // A read from the middle of a block: the first and last blocks are partial.
        let bytes = Pattern::Seed(1).bytes(256, 1024);
        check(&[Data::seed(1)], &bytes, 256).unwrap();
        let masked = Data(vec![])
            .then(256, Pattern::Any)
            .then(768, Pattern::Seed(2));
        let mut some = bytes.clone();
        some[256..].copy_from_slice(&Pattern::Seed(2).bytes(512, 768));
        check(std::slice::from_ref(&masked), &some, 256).unwrap();
        some[1000] ^= 1;
        let err = check(&[masked], &some, 256).unwrap_err();
        assert!(err.starts_with("block 2 (device bytes 1024..1280"), "{err}");
        assert!(check(&[Data::fill(0).then(1, Pattern::Any)], &bytes, 256)
            .unwrap_err()
            .contains("does not add up"));
        assert!(check(&[], &bytes, 256).is_err());
    }
}
