//! Which kernels `userblk vm` boots: the test kernels installed in `/boot` (an image whose
//! `/lib/modules/VERSION` has the `nbd` module), the newest of each series, and the parsing of
//! `--kernel 6.1,6.12|PATH`.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};

use super::VmError;

/// A kernel to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The release, as `uname -r` prints it in the guest (`6.12.117+deb12-amd64`), taken from the
    /// image's file name; `None` for an image not named `vmlinuz-RELEASE`.
    pub release: Option<String>,
    /// The image to boot.
    pub image: PathBuf,
    /// The kernel's module directory (`/lib/modules/RELEASE`), when it exists.
    pub modules: Option<PathBuf>,
}

impl Kernel {
    /// The kernel of `image`, with its modules looked up under `modules_root` (`/lib/modules`).
    pub fn from_image(image: &Path, modules_root: &Path) -> Kernel {
        let release = image
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .filter(|r| !r.is_empty())
            .map(str::to_owned);
        let modules = release
            .as_ref()
            .map(|r| modules_root.join(r))
            .filter(|d| d.is_dir());
        Kernel {
            release,
            image: image.to_path_buf(),
            modules,
        }
    }

    /// The series (`6.12`), from the release.
    pub fn series(&self) -> Option<&str> {
        self.release.as_deref().and_then(series_of)
    }

    /// Whether the modules directory has `module` (`nbd`, `ublk_drv`), as a loadable module or
    /// built in.
    pub fn has_module(&self, module: &str) -> bool {
        self.modules
            .as_deref()
            .is_some_and(|m| has_module(m, module))
    }

    /// A short name for output: the series, or the release, or the image path.
    pub fn short_name(&self) -> String {
        self.series()
            .map(str::to_owned)
            .or_else(|| self.release.clone())
            .unwrap_or_else(|| self.image.display().to_string())
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.release {
            Some(r) => f.write_str(r),
            None => write!(f, "{}", self.image.display()),
        }
    }
}

/// `6.12` from `6.12.117+deb12-amd64`, `6.1` from `6.1.0-41-amd64`: the first two numbers.
pub fn series_of(release: &str) -> Option<&str> {
    let mut dots = release.match_indices('.').map(|(i, _)| i);
    let first = dots.next()?;
    let major = &release[..first];
    let rest = &release[first + 1..];
    let minor_len = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let ok = !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()) && minor_len > 0;
    ok.then(|| &release[..first + 1 + minor_len])
}

/// Whether `module` is in `modules_dir`: a `NAME.ko*` file under `kernel/`, or a line of
/// `modules.builtin`. (`-` and `_` are the same in module names.)
fn has_module(modules_dir: &Path, module: &str) -> bool {
    let want = module.replace('-', "_");
    let matches = |file: &str| {
        let base = file.rsplit('/').next().unwrap_or(file);
        base.split_once(".ko")
            .is_some_and(|(name, _)| name.replace('-', "_") == want)
    };
    if let Ok(builtin) = std::fs::read_to_string(modules_dir.join("modules.builtin")) {
        if builtin.lines().any(|l| matches(l.trim())) {
            return true;
        }
    }
    // modules.dep lists every loadable module, one a line: "kernel/drivers/block/nbd.ko.xz: ...".
    if let Ok(dep) = std::fs::read_to_string(modules_dir.join("modules.dep")) {
        return dep
            .lines()
            .filter_map(|l| l.split(':').next())
            .any(|f| matches(f.trim()));
    }
    // No depmod output: look where block drivers live.
    std::fs::read_dir(modules_dir.join("kernel/drivers/block"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .any(|e| e.file_name().to_str().is_some_and(matches))
        })
        .unwrap_or(false)
}

/// Compares releases the way `sort -V` does: runs of digits as numbers, the rest as text.
pub fn compare_releases(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (trim_zeroes(&a[..na]), trim_zeroes(&b[..nb]));
                let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeroes(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n..]
}

/// Flavours that are not the distribution's generic kernel (Debian's `-cloud-amd64` and
/// `-rt-amd64`; Ubuntu's cloud and special kernels, such as the `-azure` one a GitHub runner
/// boots, whose ABI number is larger than the generic kernel's): picked for a series only when
/// nothing else has it.
fn special_flavour(release: &str) -> bool {
    const UBUNTU: &[&str] = &[
        "-azure",
        "-aws",
        "-gcp",
        "-gke",
        "-oracle",
        "-ibm",
        "-kvm",
        "-lowlatency",
        "-nvidia",
        "-realtime",
    ];
    ["-cloud-", "-rt-", "-dbg"]
        .iter()
        .any(|f| release.contains(f))
        || UBUNTU.iter().any(|f| release.ends_with(f))
}

/// The test kernels in `boot` (`vmlinuz-RELEASE` files whose modules under `modules_root` have
/// `nbd`): the newest generic one of each series, oldest series first.
pub fn installed(boot: &Path, modules_root: &Path) -> Vec<Kernel> {
    let mut all: Vec<Kernel> = std::fs::read_dir(boot)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.starts_with("vmlinuz-"))
                })
                .map(|e| Kernel::from_image(&e.path(), modules_root))
                .filter(|k| k.series().is_some() && k.has_module("nbd"))
                .collect()
        })
        .unwrap_or_default();
    // Within a series, generic flavours after special ones, then by release: the last is best.
    all.sort_by(|a, b| {
        let (ra, rb) = (a.release.as_deref(), b.release.as_deref());
        let (ra, rb) = (ra.unwrap_or_default(), rb.unwrap_or_default());
        compare_releases(
            a.series().unwrap_or_default(),
            b.series().unwrap_or_default(),
        )
        .then_with(|| (!special_flavour(ra)).cmp(&!special_flavour(rb)))
        .then_with(|| compare_releases(ra, rb))
    });
    let mut best: Vec<Kernel> = Vec::new();
    for k in all {
        match best.last_mut() {
            Some(last) if last.series() == k.series() => *last = k,
            _ => best.push(k),
        }
    }
    best
}

/// One `--kernel` item: a series (`6.12`), a release (`6.12.117+deb12-amd64`) or an image path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSpec {
    /// The newest installed test kernel of a series, or one exact release.
    Name(String),
    /// A kernel image file.
    Image(PathBuf),
}

impl std::str::FromStr for KernelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<KernelSpec, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err(
                "empty kernel name (expected a series such as 6.12, or an image path)".into(),
            );
        }
        if s.contains('/') {
            return Ok(KernelSpec::Image(PathBuf::from(s)));
        }
        if series_of(s).is_none() {
            return Err(format!(
                "'{s}' is neither a kernel series (6.1, 6.12), a release (6.12.117+deb12-amd64) nor a path (one with a /)"
            ));
        }
        Ok(KernelSpec::Name(s.to_owned()))
    }
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelSpec::Name(n) => f.write_str(n),
            KernelSpec::Image(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The kernels `specs` ask for, in their order, from the `installed` ones (all of them when
/// `specs` is empty); an image path is taken as it is, with its modules under `modules_root`.
pub fn select(
    specs: &[KernelSpec],
    installed: &[Kernel],
    modules_root: &Path,
) -> Result<Vec<Kernel>, VmError> {
    if specs.is_empty() {
        if installed.is_empty() {
            return Err(VmError::NoKernels);
        }
        return Ok(installed.to_vec());
    }
    let mut out: Vec<Kernel> = Vec::new();
    for spec in specs {
        let k = match spec {
            KernelSpec::Image(p) => {
                if !p.is_file() {
                    return Err(VmError::NoImage(p.clone()));
                }
                Kernel::from_image(p, modules_root)
            }
            KernelSpec::Name(n) => installed
                .iter()
                .find(|k| k.release.as_deref() == Some(n) || k.series() == Some(n))
                .cloned()
                .ok_or_else(|| VmError::KernelNotInstalled {
                    wanted: n.clone(),
                    installed: installed.iter().map(|k| k.to_string()).collect(),
                })?,
        };
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /boot and /lib/modules: `(release, modules)` where modules is what modules.dep
    /// lists (None: no modules directory).
    fn fake(kernels: &[(&str, Option<&[&str]>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("boot")).unwrap();
        for (release, modules) in kernels {
            std::fs::write(dir.path().join(format!("boot/vmlinuz-{release}")), b"").unwrap();
            if let Some(mods) = modules {
                let m = dir.path().join("modules").join(release);
                std::fs::create_dir_all(&m).unwrap();
                let dep: String = mods
                    .iter()
                    .map(|n| format!("kernel/drivers/block/{n}.ko.xz:\n"))
                    .collect();
                std::fs::write(m.join("modules.dep"), dep).unwrap();
            }
        }
        dir
    }

    fn releases(ks: &[Kernel]) -> Vec<&str> {
        ks.iter().map(|k| k.release.as_deref().unwrap()).collect()
    }

    #[test]
    fn series_are_the_first_two_numbers() {
        assert_eq!(series_of("6.12.117+deb12-amd64"), Some("6.12"));
        assert_eq!(series_of("6.1.0-41-amd64"), Some("6.1"));
        assert_eq!(series_of("6.8.0-45-generic"), Some("6.8"));
        assert_eq!(series_of("6.12"), Some("6.12"));
        assert_eq!(series_of("6"), None);
        assert_eq!(series_of("x.1"), None);
        assert_eq!(series_of("6.x"), None);
    }

    #[test]
    fn releases_compare_like_sort_v() {
        assert_eq!(compare_releases("6.12.95", "6.12.117"), Ordering::Less);
        assert_eq!(
            compare_releases("6.1.0-9-amd64", "6.1.0-41-amd64"),
            Ordering::Less
        );
        assert_eq!(compare_releases("6.9", "6.12"), Ordering::Less);
        assert_eq!(compare_releases("6.12", "6.12"), Ordering::Equal);
        assert_eq!(compare_releases("6.12", "6.12.1"), Ordering::Less);
    }

    #[test]
    fn installed_picks_the_newest_generic_kernel_with_nbd_per_series() {
        let d = fake(&[
            ("6.1.0-9-amd64", Some(&["nbd", "brd"])),
            ("6.1.0-41-amd64", Some(&["nbd"])),
            ("6.1.0-41-cloud-amd64", Some(&["nbd"])),
            ("6.12.95+deb12-amd64", Some(&["nbd"])),
            ("6.12.117+deb12-amd64", Some(&["nbd", "ublk_drv"])),
            ("6.5.0-1-amd64", Some(&["brd"])), // no nbd: not a test kernel
            ("6.6.0-1-amd64", None),           // no modules at all
        ]);
        let ks = installed(&d.path().join("boot"), &d.path().join("modules"));
        assert_eq!(releases(&ks), ["6.1.0-41-amd64", "6.12.117+deb12-amd64"]);
        assert!(ks[1].has_module("ublk_drv") && !ks[0].has_module("ublk_drv"));
        assert!(ks[0].has_module("nbd"));
        assert_eq!(ks[1].short_name(), "6.12");
    }

    #[test]
    fn ubuntu_prefers_the_generic_kernel_to_a_cloud_one_of_its_series() {
        // A GitHub runner: its own -azure kernel, and the generic kernel setup installs; the
        // azure one has the larger ABI number.
        let d = fake(&[
            ("6.8.0-1017-azure", Some(&["nbd"])),
            ("6.8.0-49-generic", Some(&["nbd", "ublk_drv"])),
            ("6.11.0-1018-azure", Some(&["nbd"])),
        ]);
        let ks = installed(&d.path().join("boot"), &d.path().join("modules"));
        assert_eq!(releases(&ks), ["6.8.0-49-generic", "6.11.0-1018-azure"]);
    }

    #[test]
    fn a_special_flavour_is_taken_when_it_is_the_only_one() {
        let d = fake(&[("6.1.0-41-cloud-amd64", Some(&["nbd"]))]);
        let ks = installed(&d.path().join("boot"), &d.path().join("modules"));
        assert_eq!(releases(&ks), ["6.1.0-41-cloud-amd64"]);
    }

    #[test]
    fn builtin_modules_count() {
        let d = fake(&[("6.1.0-1-amd64", Some(&[]))]);
        let m = d.path().join("modules/6.1.0-1-amd64");
        std::fs::write(m.join("modules.builtin"), "kernel/drivers/block/nbd.ko\n").unwrap();
        let k = Kernel::from_image(
            &d.path().join("boot/vmlinuz-6.1.0-1-amd64"),
            &d.path().join("modules"),
        );
        assert!(k.has_module("nbd"));
        assert!(!k.has_module("ublk_drv"));
    }

    #[test]
    fn specs_parse_series_releases_and_paths() {
        assert_eq!("6.12".parse(), Ok(KernelSpec::Name("6.12".into())));
        assert_eq!(
            " 6.1.0-41-amd64".parse(),
            Ok(KernelSpec::Name("6.1.0-41-amd64".into()))
        );
        assert_eq!(
            "/boot/vmlinuz-x".parse(),
            Ok(KernelSpec::Image("/boot/vmlinuz-x".into()))
        );
        assert_eq!(
            "./bzImage".parse(),
            Ok(KernelSpec::Image("./bzImage".into()))
        );
        let err = "latest".parse::<KernelSpec>().unwrap_err();
        assert!(err.contains("'latest' is neither"), "{err}");
        assert!("".parse::<KernelSpec>().is_err());
    }

    #[test]
    fn select_by_series_release_or_path_in_the_order_given() {
        let d = fake(&[
            ("6.1.0-41-amd64", Some(&["nbd"])),
            ("6.12.117+deb12-amd64", Some(&["nbd"])),
        ]);
        let (boot, mods) = (d.path().join("boot"), d.path().join("modules"));
        let inst = installed(&boot, &mods);
        let all = select(&[], &inst, &mods).unwrap();
        assert_eq!(releases(&all), ["6.1.0-41-amd64", "6.12.117+deb12-amd64"]);
        let specs: Vec<KernelSpec> = vec![
            "6.12".parse().unwrap(),
            "6.1.0-41-amd64".parse().unwrap(),
            "6.12".parse().unwrap(),
        ];
        let some = select(&specs, &inst, &mods).unwrap();
        assert_eq!(
            releases(&some),
            ["6.12.117+deb12-amd64", "6.1.0-41-amd64"],
            "duplicates dropped"
        );
        let img = boot.join("vmlinuz-6.1.0-41-amd64");
        let by_path = select(&[KernelSpec::Image(img.clone())], &inst, &mods).unwrap();
        assert_eq!(by_path[0].image, img);
        assert!(by_path[0].has_module("nbd"));
    }

    #[test]
    fn select_says_what_is_missing() {
        let d = fake(&[("6.1.0-41-amd64", Some(&["nbd"]))]);
        let (boot, mods) = (d.path().join("boot"), d.path().join("modules"));
        let inst = installed(&boot, &mods);
        let err = select(&["6.12".parse().unwrap()], &inst, &mods).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no installed test kernel matches 6.12 (installed: 6.1.0-41-amd64); `userblk vm setup` installs the test kernels"
        );
        let err = select(
            &[KernelSpec::Image("/nonexistent/bzImage".into())],
            &inst,
            &mods,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no kernel image /nonexistent/bzImage");
        let err = select(&[], &[], &mods).unwrap_err();
        assert!(matches!(err, VmError::NoKernels), "{err}");
    }
}
