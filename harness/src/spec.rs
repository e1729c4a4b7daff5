//! Device specifications on the command line: `ram:64M`, `file:disk.img`, `pattern:1G`.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use userblk::{BlockDevice, FileDevice, MemDevice, PatternDevice};

/// A built-in device, as named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `ram:SIZE`: a sparse RAM disk.
    Ram {
        /// Size in bytes.
        size: u64,
    },
    /// `file:PATH`: an existing file or block device.
    File {
        /// The path.
        path: PathBuf,
    },
    /// `pattern:SIZE`: a read-only device reading 0xdeadbeef.
    Pattern {
        /// Size in bytes.
        size: u64,
    },
}

/// Why a device specification was not understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// No `kind:` prefix, or an unknown one.
    #[error("unknown device `{0}`: expected ram:SIZE, file:PATH or pattern:SIZE")]
    UnknownKind(String),
    /// A size that is not a number with an optional K, M, G or T suffix.
    #[error("bad size `{0}`: expected a number with an optional K, M, G or T suffix (binary units), e.g. 64M")]
    BadSize(String),
    /// A size below one 512-byte block.
    #[error("size {0} is smaller than one 512-byte block")]
    TooSmall(u64),
}

/// Parses `64M`, `1G`, `4096`, `512K` (binary units).
pub fn parse_size(s: &str) -> Result<u64, SpecError> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(SpecError::BadSize(s.to_string())),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| SpecError::BadSize(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SpecError::BadSize(s.to_string()))
}

impl FromStr for DeviceSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<DeviceSpec, SpecError> {
        let (kind, arg) = s
            .split_once(':')
            .ok_or_else(|| SpecError::UnknownKind(s.to_string()))?;
        let sized = |arg: &str| {
            let size = parse_size(arg)?;
            if size < 512 {
                return Err(SpecError::TooSmall(size));
            }
            Ok(size)
        };
        match kind {
            "ram" => Ok(DeviceSpec::Ram { size: sized(arg)? }),
            "pattern" => Ok(DeviceSpec::Pattern { size: sized(arg)? }),
            "file" if !arg.is_empty() => Ok(DeviceSpec::File { path: arg.into() }),
            _ => Err(SpecError::UnknownKind(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Ram { size } => write!(f, "ram:{}", human(*size)),
            DeviceSpec::File { path } => write!(f, "file:{}", path.display()),
            DeviceSpec::Pattern { size } => write!(f, "pattern:{}", human(*size)),
        }
    }
}

/// `67108864` as `64M`.
pub fn human(size: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if size >= 1 << shift && size % (1 << shift) == 0 {
            return format!("{}{unit}", size >> shift);
        }
    }
    size.to_string()
}

impl DeviceSpec {
    /// Opens the device; `read_only` opens a file read-only.
    pub fn open(&self, read_only: bool) -> io::Result<Box<dyn BlockDevice>> {
        Ok(match self {
            DeviceSpec::Ram { size } => Box::new(MemDevice::new(*size)),
            DeviceSpec::Pattern { size } => Box::new(PatternDevice::new(*size)),
            DeviceSpec::File { path } if read_only => Box::new(FileDevice::open_read_only(path)?),
            DeviceSpec::File { path } => Box::new(FileDevice::open(path)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("ram:64M".parse(), Ok(DeviceSpec::Ram { size: 64 << 20 }));
        assert_eq!("ram:1g".parse(), Ok(DeviceSpec::Ram { size: 1 << 30 }));
        assert_eq!(
            "pattern:4096".parse(),
            Ok(DeviceSpec::Pattern { size: 4096 })
        );
        assert_eq!(
            "file:/tmp/disk.img".parse(),
            Ok(DeviceSpec::File {
                path: "/tmp/disk.img".into()
            })
        );
        assert_eq!(
            "ram:64M".parse::<DeviceSpec>().unwrap().to_string(),
            "ram:64M"
        );
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        assert_eq!(
            "disk.img".parse::<DeviceSpec>(),
            Err(SpecError::UnknownKind("disk.img".into()))
        );
        assert_eq!(
            "ram:64Q".parse::<DeviceSpec>(),
            Err(SpecError::BadSize("64Q".into()))
        );
        assert_eq!(
            "ram:".parse::<DeviceSpec>(),
            Err(SpecError::BadSize("".into()))
        );
        assert_eq!(
            "ram:100".parse::<DeviceSpec>(),
            Err(SpecError::TooSmall(100))
        );
        assert_eq!(
            "ram:99999999999T".parse::<DeviceSpec>(),
            Err(SpecError::BadSize("99999999999T".into()))
        );
        assert!("file:".parse::<DeviceSpec>().is_err());
    }
}
