//! The manager's catalogue (`docs/images.md`): images a VM boots from and templates that
//! give a new VM its defaults, and how a host names an image's files in its store.
//!
//! An image is a set of files (a kernel, its initramfs, a root disk), each known by size
//! and SHA-256 before a byte of it is uploaded; the manager takes each upload only if it
//! matches, and a host that copies the files into its store checks them the same way.
//! Files are stored under names that carry their hash ([`ImageFile::stored_name`]), so an
//! image deleted and imported again under its old name never changes a file that an
//! existing VM's disk is an overlay on.

use serde::{Deserialize, Serialize};
use tern_model::{ImageName, TemplateName};

/// Largest image file accepted (64 GiB): a root disk is the largest.
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 30;

/// Longest kernel command line an image or template may carry (Linux's x86 limit).
pub const MAX_CMDLINE: usize = 2048;

/// Most templates and images a catalogue holds; a runaway script is refused, not stored.
pub const MAX_CATALOGUE_ENTRIES: usize = 1024;

/// What a file of an image is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileRole {
    /// The kernel QEMU boots directly.
    Kernel,
    /// Its initramfs.
    Initramfs,
    /// A root disk a VM's first disk is a copy-on-write overlay on.
    Disk,
}

impl FileRole {
    pub const ALL: [FileRole; 3] = [Self::Kernel, Self::Initramfs, Self::Disk];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Initramfs => "initramfs",
            Self::Disk => "disk",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The format of a disk file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// One file of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageFile {
    pub role: FileRole,
    /// Bytes in the file.
    pub size: u64,
    /// SHA-256 of the file, 64 lower-case hex digits.
    pub sha256: String,
    /// A disk's format; absent for a kernel or initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// The size a guest sees of a disk, in MiB (a qcow2 file is smaller than that): what
    /// a VM's overlay on it takes of a store at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_mib: Option<u64>,
}

impl ImageFile {
    /// The file's name in a store's `images/` directory and in the catalogue:
    /// `IMAGE-HASH.EXT`, HASH the first 16 hex digits of its SHA-256.
    pub fn stored_name(&self, image: &str) -> String {
        let ext = match (self.role, self.format) {
            (FileRole::Kernel, _) => "vmlinuz",
            (FileRole::Initramfs, _) => "initramfs",
            (FileRole::Disk, Some(f)) => f.as_str(),
            (FileRole::Disk, None) => "img",
        };
        format!(
            "{image}-{}.{ext}",
            &self.sha256[..16.min(self.sha256.len())]
        )
    }

    /// Checks that need nothing but the value (pure).
    pub fn validate(&self) -> Result<(), String> {
        let role = self.role.as_str();
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "{role} file: sha256 {:?} is not 64 lower-case hex digits",
                self.sha256
            ));
        }
        if self.size == 0 || self.size > MAX_IMAGE_FILE_BYTES {
            return Err(format!(
                "{role} file: size {} is outside 1..={MAX_IMAGE_FILE_BYTES} bytes",
                self.size
            ));
        }
        match (self.role, self.format, self.virtual_mib) {
            (FileRole::Disk, None, _) => Err(
                "disk file: give its format (\"qcow2\" or \"raw\"), as `qemu-img info` says".into(),
            ),
            (FileRole::Disk, _, None | Some(0)) => Err(
                "disk file: give virtual_mib, the size the guest sees, as `qemu-img info` says"
                    .into(),
            ),
            (FileRole::Disk, _, Some(mib)) if mib > crate::agent::MAX_DISK_MIB => Err(format!(
                "disk file: virtual_mib {mib} is above the limit of {} MiB",
                crate::agent::MAX_DISK_MIB
            )),
            (FileRole::Kernel | FileRole::Initramfs, Some(_), _)
            | (FileRole::Kernel | FileRole::Initramfs, _, Some(_)) => Err(format!(
                "{role} file: format and virtual_mib belong to disk files only"
            )),
            _ => Ok(()),
        }
    }
}

/// A digest as the catalogue writes hashes: lower-case hex.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// An image to add to the catalogue: its files are uploaded after it, one by one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewImage {
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "minimal"))]
    pub name: ImageName,
    /// Kernel command line the image boots with; a VM adds its own after it.
    #[serde(default)]
    pub cmdline: String,
    pub files: Vec<ImageFile>,
    /// One line for people.
    #[serde(default)]
    pub description: String,
}

impl NewImage {
    /// Checks that need nothing but the value (pure): a kernel, at most one initramfs
    /// and one disk, each file valid, a command line of sane length.
    pub fn validate(&self) -> Result<(), String> {
        let count = |r: FileRole| self.files.iter().filter(|f| f.role == r).count();
        if count(FileRole::Kernel) != 1 {
            return Err(format!(
                "image {:?} needs exactly one kernel file (tern boots the kernel directly); it has {}",
                self.name.as_str(),
                count(FileRole::Kernel)
            ));
        }
        for r in [FileRole::Initramfs, FileRole::Disk] {
            if count(r) > 1 {
                return Err(format!(
                    "image {:?} has {} {} files; at most one",
                    self.name.as_str(),
                    count(r),
                    r.as_str()
                ));
            }
        }
        for f in &self.files {
            f.validate()?;
        }
        check_cmdline(&self.cmdline)?;
        if self.description.len() > 256 || self.description.contains(['\n', '\r']) {
            return Err("description: one line of at most 256 bytes".into());
        }
        Ok(())
    }
}

/// A kernel command line: bounded, one line, printable (pure).
pub fn check_cmdline(cmdline: &str) -> Result<(), String> {
    if cmdline.len() > MAX_CMDLINE {
        return Err(format!(
            "kernel command line is {} bytes, more than {MAX_CMDLINE}",
            cmdline.len()
        ));
    }
    if cmdline.chars().any(|c| c.is_control()) {
        return Err("kernel command line must be one line without control characters".into());
    }
    Ok(())
}

/// Whether an image's files have all arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Recorded; some files are still to be uploaded. VMs cannot use it yet.
    Uploading,
    /// Every file arrived and matched its hash.
    Ready,
}

/// An image of the catalogue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Image {
    pub name: String,
    pub cmdline: String,
    pub files: Vec<ImageFile>,
    #[serde(default)]
    pub description: String,
    pub state: ImageState,
    /// The files uploaded so far.
    #[serde(default)]
    pub received: Vec<FileRole>,
    /// When it was added, in ms since the Unix epoch.
    pub created: u64,
}

impl Image {
    pub fn file(&self, role: FileRole) -> Option<&ImageFile> {
        self.files.iter().find(|f| f.role == role)
    }

    /// Bytes of all its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A disk of a template or a VM, as the manager knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmDisk {
    /// Letters, digits, `-` and `_`; unique within the VM (`root`, `data`).
    pub name: String,
    /// Size the guest sees, in MiB. Required for a blank disk; for the image's disk,
    /// absent means the image's own size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    /// Starts as the VM's image's root disk (a copy-on-write overlay on it) rather than
    /// blank. At most one disk of a VM does.
    #[serde(default)]
    pub from_image: bool,
    /// `shared` (the store every host mounts; the disk stays put when the VM moves) or
    /// `local` (the host's own store; a live migration copies it). Absent: the
    /// template's choice for a disk of that name, else `shared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::agent::DiskStore>,
    /// The controller the guest sees it on: `virtio_blk` or `virtio_scsi`. Absent: the
    /// template's choice for a disk of that name, else `virtio_blk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<crate::agent::DiskBus>,
}

impl VmDisk {
    /// Checks that need nothing but the value (pure).
    pub fn validate(&self) -> Result<(), String> {
        crate::agent::DiskSpec {
            name: self.name.clone(),
            size_mib: self.size_mib,
            image: self.from_image.then(|| "image".to_owned()),
            bus: self.bus.unwrap_or_default(),
            store: self.store.unwrap_or_default(),
        }
        .validate()
    }
}

/// Checks a VM's or template's disks together (pure): each valid, names unique, at most
/// [`crate::agent::MAX_DISKS`], at most one from the image.
pub fn check_disks(disks: &[VmDisk]) -> Result<(), String> {
    if disks.len() > crate::agent::MAX_DISKS {
        return Err(format!(
            "{} disks: at most {} per VM",
            disks.len(),
            crate::agent::MAX_DISKS
        ));
    }
    for (i, d) in disks.iter().enumerate() {
        d.validate()?;
        if disks[..i].iter().any(|e| e.name == d.name) {
            return Err(format!("two disks are named {:?}", d.name));
        }
    }
    if disks.iter().filter(|d| d.from_image).count() > 1 {
        return Err("only one disk may start from the image".into());
    }
    Ok(())
}

/// A template: an image with the defaults a VM made from it gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Template {
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "debian"))]
    pub name: TemplateName,
    /// The catalogue image VMs made from it boot.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "debian-12"))]
    pub image: ImageName,
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    pub vcpus: u32,
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1048576))]
    pub memory_mib: u64,
    /// Disks; absent: one disk `root` from the image if the image has a disk, none if not.
    #[serde(default)]
    pub disks: Option<Vec<VmDisk>>,
    /// Kernel command line added after the image's.
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub description: String,
}

impl Template {
    /// Checks that need nothing but the value (pure); the image's existence is the
    /// manager's to check.
    pub fn validate(&self) -> Result<(), String> {
        if self.vcpus == 0 || self.vcpus > crate::manager::MAX_VCPUS {
            return Err(format!(
                "template {:?}: vcpus {} is outside 1..={}",
                self.name.as_str(),
                self.vcpus,
                crate::manager::MAX_VCPUS
            ));
        }
        if self.memory_mib == 0 || self.memory_mib > crate::manager::MAX_MEMORY_MIB {
            return Err(format!(
                "template {:?}: memory_mib {} is outside 1..={}",
                self.name.as_str(),
                self.memory_mib,
                crate::manager::MAX_MEMORY_MIB
            ));
        }
        if let Some(d) = &self.disks {
            check_disks(d)?;
        }
        check_cmdline(&self.cmdline)?;
        if self.description.len() > 256 || self.description.contains(['\n', '\r']) {
            return Err("description: one line of at most 256 bytes".into());
        }
        Ok(())
    }

    /// The disks a VM made from it gets, given whether its image has a disk.
    pub fn disks_for(&self, image_has_disk: bool) -> Vec<VmDisk> {
        match &self.disks {
            Some(d) => d.clone(),
            None if image_has_disk => vec![VmDisk {
                name: "root".into(),
                size_mib: None,
                from_image: true,
                store: Default::default(),
                bus: None,
            }],
            None => Vec::new(),
        }
    }
}

/// Where a host finds a VM's image files: the catalogue image they belong to and each
/// file it needs in its store, fetched from the manager when missing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub name: ImageName,
    pub files: Vec<ImageFile>,
}

impl ImageRef {
    pub fn file(&self, role: FileRole) -> Option<&ImageFile> {
        self.files.iter().find(|f| f.role == role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(role: FileRole) -> ImageFile {
        ImageFile {
            role,
            size: 10,
            sha256: "ab".repeat(32),
            format: (role == FileRole::Disk).then_some(DiskFormat::Qcow2),
            virtual_mib: (role == FileRole::Disk).then_some(2048),
        }
    }

    fn image(files: Vec<ImageFile>) -> NewImage {
        NewImage {
            name: "debian-12".parse().unwrap(),
            cmdline: "console=ttyS0".into(),
            files,
            description: String::new(),
        }
    }

    #[test]
    fn hashes_are_lower_case_hex() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }

    #[test]
    fn stored_names_carry_the_hash_so_a_reimport_never_overwrites() {
        let f = file(FileRole::Disk);
        assert_eq!(
            f.stored_name("debian-12"),
            "debian-12-abababababababab.qcow2"
        );
        let mut g = f.clone();
        g.sha256 = "cd".repeat(32);
        assert_ne!(f.stored_name("debian-12"), g.stored_name("debian-12"));
        assert_eq!(
            file(FileRole::Kernel).stored_name("m"),
            "m-abababababababab.vmlinuz"
        );
        // A stored name is a plain store file name the agent accepts.
        crate::agent::check_store_name("image", &f.stored_name("debian-12")).unwrap();
    }

    #[test]
    fn an_image_needs_one_kernel_and_well_formed_files() {
        let ok = image(vec![file(FileRole::Kernel), file(FileRole::Disk)]);
        ok.validate().unwrap();
        let e = image(vec![file(FileRole::Disk)]).validate().unwrap_err();
        assert!(e.contains("exactly one kernel"), "{e}");
        let e = image(vec![file(FileRole::Kernel), file(FileRole::Kernel)])
            .validate()
            .unwrap_err();
        assert!(e.contains("exactly one kernel"), "{e}");
        let mut bad = file(FileRole::Kernel);
        bad.sha256 = "AB".repeat(32);
        assert!(image(vec![bad]).validate().unwrap_err().contains("sha256"));
        let mut bad = file(FileRole::Disk);
        bad.format = None;
        let e = image(vec![file(FileRole::Kernel), bad])
            .validate()
            .unwrap_err();
        assert!(e.contains("format"), "{e}");
        let mut bad = file(FileRole::Kernel);
        bad.size = MAX_IMAGE_FILE_BYTES + 1;
        assert!(image(vec![bad]).validate().unwrap_err().contains("size"));
        let mut long = image(vec![file(FileRole::Kernel)]);
        long.cmdline = "x".repeat(MAX_CMDLINE + 1);
        assert!(long.validate().is_err());
        long.cmdline = "a\nb".into();
        assert!(long.validate().is_err());
    }

    #[test]
    fn disks_are_checked_together() {
        let d = |name: &str, size: Option<u64>, from_image| VmDisk {
            name: name.into(),
            size_mib: size,
            from_image,
            store: Default::default(),
            bus: None,
        };
        check_disks(&[d("root", None, true), d("data", Some(1024), false)]).unwrap();
        assert!(check_disks(&[d("root", None, true), d("root", Some(1), false)]).is_err());
        assert!(check_disks(&[d("a", None, true), d("b", None, true)]).is_err());
        assert!(check_disks(&[d("data", None, false)])
            .unwrap_err()
            .contains("size_mib"));
        assert!(check_disks(&[d("../x", Some(1), false)]).is_err());
        let many: Vec<_> = (0..17)
            .map(|i| d(&format!("d{i}"), Some(1), false))
            .collect();
        assert!(check_disks(&many).is_err());
    }

    #[test]
    fn a_template_without_disks_gets_a_root_disk_when_its_image_has_one() {
        let t = Template {
            name: "debian".parse().unwrap(),
            image: "debian-12".parse().unwrap(),
            vcpus: 1,
            memory_mib: 512,
            disks: None,
            cmdline: String::new(),
            description: String::new(),
        };
        t.validate().unwrap();
        assert_eq!(t.disks_for(true).len(), 1);
        assert!(t.disks_for(true)[0].from_image);
        assert!(t.disks_for(false).is_empty());
        let zero = Template { vcpus: 0, ..t };
        assert!(zero.validate().unwrap_err().contains("vcpus"));
    }
}
