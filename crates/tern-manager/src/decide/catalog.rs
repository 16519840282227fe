//! The catalogue's decisions (`docs/images.md`): adding, completing and deleting images,
//! creating and deleting templates, and filling a new VM's spec from its template.

use tern_api::catalog::{
    check_cmdline, check_disks, FileRole, Image, ImageState, NewImage, Template,
    MAX_CATALOGUE_ENTRIES,
};

use super::{Decision, Reply};
use crate::error::{Error, Result};
use crate::state::{Change, EventKind, Millis, Snapshot, VmSpec};

/// The template a VM made without naming one gets, when the catalogue has it.
pub const DEFAULT_TEMPLATE: &str = "default";

/// Records a new image, waiting for its files.
pub fn add_image(snap: &Snapshot, now: Millis, new: NewImage) -> Result<Decision> {
    new.validate().map_err(Error::BadInput)?;
    let name = new.name.into_string();
    if snap.images.contains_key(&name) {
        return Err(Error::Conflict(format!(
            "an image named {name:?} already exists; delete it first (`tern image delete \
             {name}`) or pick another name"
        )));
    }
    if snap.images.len() >= MAX_CATALOGUE_ENTRIES {
        return Err(Error::Conflict(format!(
            "the catalogue holds {MAX_CATALOGUE_ENTRIES} images already; delete some first"
        )));
    }
    let image = Image {
        name: name.clone(),
        cmdline: new.cmdline,
        files: new.files,
        description: new.description,
        state: ImageState::Uploading,
        received: Vec::new(),
        created: now,
    };
    Ok((
        vec![
            Change::PutImage(image.clone()),
            Change::Event(EventKind::ImageAdded { image: name }),
        ],
        Reply::Image(image),
    ))
}

/// Notes that `role`'s file of `image` arrived and matched; the last one makes it ready.
pub fn file_received(snap: &Snapshot, image: &str, role: FileRole) -> Result<Decision> {
    let i = snap
        .images
        .get(image)
        .ok_or_else(|| Error::UnknownImage(image.to_owned()))?;
    if i.file(role).is_none() {
        return Err(Error::BadInput(format!(
            "image {image:?} has no {} file",
            role.as_str()
        )));
    }
    let mut next = i.clone();
    if !next.received.contains(&role) {
        next.received.push(role);
        next.received.sort();
    }
    let complete = next.files.iter().all(|f| next.received.contains(&f.role));
    let mut changes = Vec::new();
    if complete && next.state != ImageState::Ready {
        next.state = ImageState::Ready;
        changes.push(Change::Event(EventKind::ImageReady {
            image: image.to_owned(),
        }));
    }
    if next != *i {
        changes.insert(0, Change::PutImage(next.clone()));
    }
    Ok((changes, Reply::Image(next)))
}

/// Deletes an image no template and no VM uses.
pub fn delete_image(snap: &Snapshot, name: &str) -> Result<Decision> {
    let i = snap
        .images
        .get(name)
        .ok_or_else(|| Error::UnknownImage(name.to_owned()))?;
    let templates: Vec<&str> = snap
        .templates
        .values()
        .filter(|t| t.image.as_str() == name)
        .map(|t| t.name.as_str())
        .collect();
    let vms: Vec<&str> = snap
        .vms
        .values()
        .filter(|v| v.spec.image.as_deref() == Some(name))
        .map(|v| v.name.as_str())
        .take(5)
        .collect();
    if !templates.is_empty() || !vms.is_empty() {
        return Err(Error::Conflict(format!(
            "image {name:?} is in use (templates {templates:?}, VMs {vms:?}): a VM's disk is \
             an overlay on it; delete those first"
        )));
    }
    Ok((
        vec![
            Change::RemoveImage(name.to_owned()),
            Change::Event(EventKind::ImageDeleted {
                image: name.to_owned(),
            }),
        ],
        Reply::Image(i.clone()),
    ))
}

/// Creates a template over an image of the catalogue.
pub fn create_template(snap: &Snapshot, t: Template) -> Result<Decision> {
    t.validate().map_err(Error::BadInput)?;
    let name = t.name.to_string();
    if snap.templates.contains_key(&name) {
        return Err(Error::Conflict(format!(
            "a template named {name:?} already exists; delete it first or pick another name"
        )));
    }
    if snap.templates.len() >= MAX_CATALOGUE_ENTRIES {
        return Err(Error::Conflict(format!(
            "the catalogue holds {MAX_CATALOGUE_ENTRIES} templates already; delete some first"
        )));
    }
    let image = snap
        .images
        .get(t.image.as_str())
        .ok_or_else(|| Error::UnknownImage(t.image.to_string()))?;
    check_disks_fit(&t.disks_for(image.file(FileRole::Disk).is_some()), image)?;
    Ok((
        vec![
            Change::PutTemplate(t.clone()),
            Change::Event(EventKind::TemplateCreated { template: name }),
        ],
        Reply::Template(t),
    ))
}

pub fn delete_template(snap: &Snapshot, name: &str) -> Result<Decision> {
    let t = snap
        .templates
        .get(name)
        .ok_or_else(|| Error::UnknownTemplate(name.to_owned()))?;
    Ok((
        vec![
            Change::RemoveTemplate(name.to_owned()),
            Change::Event(EventKind::TemplateDeleted {
                template: name.to_owned(),
            }),
        ],
        Reply::Template(t.clone()),
    ))
}

/// `base` with each disk of `asked` resizing the one of its name (a size, bus or store
/// given wins), or added after them (pure).
fn merge_disks(
    mut base: Vec<tern_api::catalog::VmDisk>,
    asked: Vec<tern_api::catalog::VmDisk>,
) -> Vec<tern_api::catalog::VmDisk> {
    for d in asked {
        match base.iter_mut().find(|b| b.name == d.name) {
            Some(b) => {
                b.size_mib = d.size_mib.or(b.size_mib);
                b.from_image |= d.from_image;
                b.bus = d.bus.or(b.bus);
                b.store = d.store.or(b.store);
            }
            None => base.push(d),
        }
    }
    base
}

/// A disk from the image needs an image with a disk, and no smaller than it.
fn check_disks_fit(disks: &[tern_api::catalog::VmDisk], image: &Image) -> Result<()> {
    for d in disks.iter().filter(|d| d.from_image) {
        let Some(f) = image.file(FileRole::Disk) else {
            return Err(Error::BadInput(format!(
                "disk {:?} starts from image {:?}, which has no disk (only a kernel{}); \
                 make it a blank disk with a size",
                d.name,
                image.name,
                if image.file(FileRole::Initramfs).is_some() {
                    " and initramfs"
                } else {
                    ""
                }
            )));
        };
        if let (Some(want), Some(has)) = (d.size_mib, f.virtual_mib) {
            if want < has {
                return Err(Error::BadInput(format!(
                    "disk {:?} of {want} MiB is smaller than image {:?}'s disk of {has} MiB",
                    d.name, image.name
                )));
            }
        }
    }
    Ok(())
}

/// A create request's spec completed from its template (pure): `template` when named
/// (unknown: an error), else the catalogue's `default` template if there is one. Zero
/// sizes and no image take the template's values; the request's disks resize the
/// template's disks of the same name and add the others; a command line is added after
/// the template's. The image must be ready, and the disks must suit it.
pub fn resolve_spec(snap: &Snapshot, spec: VmSpec, template: Option<&str>) -> Result<VmSpec> {
    let t = match template {
        Some(name) => Some(snap.templates.get(name).ok_or_else(|| {
            Error::BadInput(format!(
                "no template named {name:?}; `tern template list` lists them"
            ))
        })?),
        None => snap.templates.get(DEFAULT_TEMPLATE),
    };
    let mut spec = spec;
    if let Some(t) = t {
        if spec.vcpus == 0 {
            spec.vcpus = t.vcpus;
        }
        if spec.memory_mib == 0 {
            spec.memory_mib = t.memory_mib;
        }
        let own_image = spec.image.is_some();
        if !own_image {
            spec.image = Some(t.image.to_string());
        }
        let has_disk = snap
            .images
            .get(spec.image.as_deref().unwrap_or_default())
            .is_some_and(|i| i.file(FileRole::Disk).is_some());
        spec.disks = merge_disks(t.disks_for(has_disk), std::mem::take(&mut spec.disks));
        // The template's command line belongs to its image; an image of one's own
        // comes with its own.
        if !own_image && !t.cmdline.is_empty() {
            spec.cmdline = match spec.cmdline.is_empty() {
                true => t.cmdline.clone(),
                false => format!("{} {}", t.cmdline, spec.cmdline),
            };
        }
        spec.template = Some(t.name.to_string());
    } else if spec.vcpus == 0 || spec.memory_mib == 0 {
        return Err(Error::BadInput(format!(
            "give vcpus and memory_mib, or a template (there is no {DEFAULT_TEMPLATE:?} \
             template): `tern vm create NAME --vcpus 1 --memory-mib 512`, or \
             `--template T` (`tern template list`)"
        )));
    }
    check_cmdline(&spec.cmdline).map_err(Error::BadInput)?;
    check_disks(&spec.disks).map_err(Error::BadInput)?;
    match &spec.image {
        Some(name) => {
            let image = snap.images.get(name).ok_or_else(|| {
                Error::BadInput(format!(
                    "no image named {name:?} in the catalogue; `tern image list` lists them"
                ))
            })?;
            if image.state != ImageState::Ready {
                return Err(Error::Conflict(format!(
                    "image {name:?} is still being uploaded ({} of {} files arrived); \
                     finish `tern image import` first",
                    image.received.len(),
                    image.files.len()
                )));
            }
            check_disks_fit(&spec.disks, image)?;
        }
        None => {
            if let Some(d) = spec.disks.iter().find(|d| d.from_image) {
                return Err(Error::BadInput(format!(
                    "disk {:?} starts from the image, but the VM has none: give an image \
                     or a template",
                    d.name
                )));
            }
        }
    }
    Ok(spec)
}

/// The store space a VM's disks take at most, in MiB (pure): each disk's size, a disk
/// from the image without a size its image's size (every disk may be filled).
pub fn disk_mib(spec: &VmSpec, snap: &Snapshot) -> u64 {
    disk_mib_with(spec, |i| image_disk_mib(snap, i))
}

/// The size of image `name`'s disk in MiB, if it has one.
pub fn image_disk_mib(snap: &Snapshot, name: &str) -> Option<u64> {
    snap.images
        .get(name)
        .and_then(|i| i.file(FileRole::Disk))
        .and_then(|f| f.virtual_mib)
}

/// [`disk_mib`] with the image sizes from `image_mib` (pure).
pub fn disk_mib_with(spec: &VmSpec, image_mib: impl Fn(&str) -> Option<u64>) -> u64 {
    let from_image = spec.image.as_deref().and_then(image_mib).unwrap_or(0);
    spec.disks
        .iter()
        .map(|d| match (d.size_mib, d.from_image) {
            (Some(s), _) => s,
            (None, true) => from_image,
            (None, false) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::catalog::{DiskFormat, ImageFile, VmDisk};

    fn file(role: FileRole, sha: &str) -> ImageFile {
        ImageFile {
            role,
            size: 100,
            sha256: sha.repeat(64),
            format: (role == FileRole::Disk).then_some(DiskFormat::Qcow2),
            virtual_mib: (role == FileRole::Disk).then_some(2048),
        }
    }

    fn new_image(name: &str, disk: bool) -> NewImage {
        let mut files = vec![file(FileRole::Kernel, "a"), file(FileRole::Initramfs, "b")];
        if disk {
            files.push(file(FileRole::Disk, "c"));
        }
        NewImage {
            name: name.parse().unwrap(),
            cmdline: "console=ttyS0".into(),
            files,
            description: String::new(),
        }
    }

    fn apply(snap: &mut Snapshot, d: Result<Decision>) -> Reply {
        let (changes, reply) = d.unwrap();
        snap.apply(&changes, &[]);
        reply
    }

    /// A snapshot with image `debian` (kernel, initramfs, disk) ready and template `t`.
    fn catalogue() -> Snapshot {
        let mut snap = Snapshot::default();
        let d = add_image(&snap, 1, new_image("debian", true));
        apply(&mut snap, d);
        for r in FileRole::ALL {
            let d = file_received(&snap, "debian", r);
            apply(&mut snap, d);
        }
        let t = Template {
            name: "t".parse().unwrap(),
            image: "debian".parse().unwrap(),
            vcpus: 2,
            memory_mib: 512,
            disks: None,
            cmdline: "quiet".into(),
            description: String::new(),
        };
        let d = create_template(&snap, t);
        apply(&mut snap, d);
        snap
    }

    #[test]
    fn an_image_is_ready_once_every_file_arrived() {
        let mut snap = Snapshot::default();
        let d = add_image(&snap, 1, new_image("m", false));
        apply(&mut snap, d);
        assert_eq!(snap.images["m"].state, ImageState::Uploading);
        let d = file_received(&snap, "m", FileRole::Kernel);
        apply(&mut snap, d);
        assert_eq!(snap.images["m"].state, ImageState::Uploading);
        let (changes, _) = file_received(&snap, "m", FileRole::Initramfs).unwrap();
        assert!(changes
            .iter()
            .any(|c| matches!(c, Change::Event(EventKind::ImageReady { .. }))));
        snap.apply(&changes, &[]);
        assert_eq!(snap.images["m"].state, ImageState::Ready);
        // Again: nothing changes.
        assert!(file_received(&snap, "m", FileRole::Kernel)
            .unwrap()
            .0
            .is_empty());
        // A file it does not have.
        assert!(matches!(
            file_received(&snap, "m", FileRole::Disk),
            Err(Error::BadInput(_))
        ));
        assert!(matches!(
            add_image(&snap, 2, new_image("m", false)),
            Err(Error::Conflict(_))
        ));
    }

    #[test]
    fn a_spec_takes_what_it_leaves_out_from_its_template() {
        let snap = catalogue();
        let s = resolve_spec(&snap, VmSpec::sized(0, 0), Some("t")).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (2, 512));
        assert_eq!(s.image.as_deref(), Some("debian"));
        assert_eq!(s.disks.len(), 1);
        assert!(s.disks[0].from_image);
        assert_eq!(s.cmdline, "quiet");
        assert_eq!(s.template.as_deref(), Some("t"));
        // Its own sizes, disks and command line win.
        let mut own = VmSpec::sized(4, 1024);
        own.disks = vec![
            VmDisk {
                name: "root".into(),
                size_mib: Some(4096),
                from_image: false,
                store: Default::default(),
                bus: None,
            },
            VmDisk {
                name: "data".into(),
                size_mib: Some(100),
                from_image: false,
                store: Default::default(),
                bus: None,
            },
        ];
        own.cmdline = "debug".into();
        let s = resolve_spec(&snap, own, Some("t")).unwrap();
        assert_eq!((s.vcpus, s.memory_mib, s.disks.len()), (4, 1024, 2));
        assert_eq!(s.cmdline, "quiet debug");
        assert_eq!(disk_mib(&s, &snap), 4196);
        let s = resolve_spec(&snap, VmSpec::sized(0, 0), Some("t")).unwrap();
        assert_eq!(disk_mib(&s, &snap), 2048, "the image's size");
    }

    #[test]
    fn bad_requests_are_refused_with_what_to_do() {
        let mut snap = catalogue();
        let e = resolve_spec(&snap, VmSpec::sized(0, 0), Some("nope")).unwrap_err();
        assert!(e.to_string().contains("no template named \"nope\""), "{e}");
        let e = resolve_spec(&snap, VmSpec::sized(0, 512), None).unwrap_err();
        assert!(e.to_string().contains("give vcpus"), "{e}");
        let mut small = VmSpec::sized(1, 64);
        small.image = Some("debian".into());
        small.disks = vec![VmDisk {
            name: "root".into(),
            size_mib: Some(100),
            from_image: true,
            store: Default::default(),
            bus: None,
        }];
        let e = resolve_spec(&snap, small, None).unwrap_err();
        assert!(e.to_string().contains("smaller than image"), "{e}");
        let mut ghost = VmSpec::sized(1, 64);
        ghost.image = Some("ghost".into());
        assert!(matches!(
            resolve_spec(&snap, ghost, None),
            Err(Error::BadInput(_))
        ));
        // An image still uploading is not bootable yet.
        let d = add_image(&snap, 1, new_image("up", false));
        apply(&mut snap, d);
        let mut up = VmSpec::sized(1, 64);
        up.image = Some("up".into());
        assert!(matches!(
            resolve_spec(&snap, up, None),
            Err(Error::Conflict(_))
        ));
        // A disk from an image without a disk.
        let t = Template {
            name: "bad".parse().unwrap(),
            image: "up".parse().unwrap(),
            vcpus: 1,
            memory_mib: 64,
            disks: Some(vec![VmDisk {
                name: "root".into(),
                size_mib: None,
                from_image: true,
                store: Default::default(),
                bus: None,
            }]),
            cmdline: String::new(),
            description: String::new(),
        };
        let e = create_template(&snap, t).unwrap_err();
        assert!(e.to_string().contains("has no disk"), "{e}");
    }

    #[test]
    fn a_disk_keeps_its_templates_bus_unless_one_is_asked() {
        use tern_api::agent::DiskBus;
        let d = |name: &str, size: Option<u64>, bus| VmDisk {
            name: name.into(),
            size_mib: size,
            from_image: false,
            store: Default::default(),
            bus,
        };
        let base = vec![d("root", Some(1024), Some(DiskBus::VirtioScsi))];
        let m = merge_disks(base.clone(), vec![d("root", Some(8192), None)]);
        assert_eq!(
            (m[0].size_mib, m[0].bus),
            (Some(8192), Some(DiskBus::VirtioScsi))
        );
        let m = merge_disks(
            base.clone(),
            vec![d("root", None, Some(DiskBus::VirtioBlk))],
        );
        assert_eq!(
            (m[0].size_mib, m[0].bus),
            (Some(1024), Some(DiskBus::VirtioBlk))
        );
        let m = merge_disks(base, vec![d("data", Some(1), Some(DiskBus::VirtioScsi))]);
        assert_eq!(m[1].bus, Some(DiskBus::VirtioScsi));
        // What the host is told: no bus is virtio_blk.
        let mut spec = VmSpec::sized(1, 64);
        spec.disks = vec![
            d("a", Some(1), None),
            d("b", Some(1), Some(DiskBus::VirtioScsi)),
        ];
        let h = spec.host_spec("v", None);
        assert_eq!(h.disks[0].bus, DiskBus::VirtioBlk);
        assert_eq!(h.disks[1].bus, DiskBus::VirtioScsi);
    }

    #[test]
    fn a_disk_keeps_its_templates_store_unless_one_is_asked() {
        use tern_api::agent::DiskStore;
        let d = |store| VmDisk {
            name: "root".into(),
            size_mib: None,
            from_image: true,
            store,
            bus: None,
        };
        let local = vec![d(Some(DiskStore::Local))];
        let m = merge_disks(local.clone(), vec![d(None)]);
        assert_eq!(m[0].store, Some(DiskStore::Local));
        let m = merge_disks(local, vec![d(Some(DiskStore::Shared))]);
        assert_eq!(m[0].store, Some(DiskStore::Shared));
        let m = merge_disks(vec![d(None)], vec![d(Some(DiskStore::Local))]);
        assert_eq!(m[0].store, Some(DiskStore::Local));
        // What the host is told: no store is the shared one.
        let mut spec = VmSpec::sized(1, 64);
        spec.disks = vec![d(None), d(Some(DiskStore::Local))];
        spec.disks[1].name = "b".into();
        let h = spec.host_spec("v", None);
        assert_eq!(h.disks[0].store, DiskStore::Shared);
        assert_eq!(h.disks[1].store, DiskStore::Local);
    }

    #[test]
    fn the_default_template_applies_when_none_is_named() {
        let mut snap = catalogue();
        let d = Template {
            name: DEFAULT_TEMPLATE.parse().unwrap(),
            ..snap.templates["t"].clone()
        };
        let d = create_template(&snap, d);
        apply(&mut snap, d);
        let s = resolve_spec(&snap, VmSpec::sized(0, 0), None).unwrap();
        assert_eq!(s.template.as_deref(), Some(DEFAULT_TEMPLATE));
        assert_eq!(s.image.as_deref(), Some("debian"));
    }

    #[test]
    fn an_image_in_use_is_not_deleted() {
        let mut snap = catalogue();
        let e = delete_image(&snap, "debian").unwrap_err();
        assert!(e.to_string().contains("templates [\"t\"]"), "{e}");
        let d = delete_template(&snap, "t");
        apply(&mut snap, d);
        let mut vm = crate::decide::testing::spec(1, 64);
        vm.image = Some("debian".into());
        crate::decide::testing::running(&mut snap, "v", "h", vm);
        let e = delete_image(&snap, "debian").unwrap_err();
        assert!(e.to_string().contains("VMs [\"v\"]"), "{e}");
        snap.vms.clear();
        let d = delete_image(&snap, "debian");
        apply(&mut snap, d);
        assert!(snap.images.is_empty());
        assert!(matches!(
            delete_image(&snap, "debian"),
            Err(Error::UnknownImage(_))
        ));
    }
}
