//! The catalogue over real HTTP with the typed client: an image's files uploaded and
//! downloaded byte for byte, a file that differs from what was declared refused and not
//! kept, templates filling a VM's spec, and refusals that create nothing.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tern_api::catalog::{FileRole, ImageFile, ImageState, NewImage, Template};
use tern_api::client::ManagerClient;
use tern_api::manager::{CreateVm, VmSpec};
use tern_manager::manager::system_clock;
use tern_manager::store::SqliteStore;
use tern_manager::Manager;

const TOKEN: &str = "s3cret";
const T: Duration = Duration::from_secs(10);

struct Server {
    client: ManagerClient,
    catalog: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn serve() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    let catalog = dir.path().join("catalog");
    let manager = Arc::new(
        Manager::open(Box::new(store), system_clock())
            .unwrap()
            .with_catalog(catalog.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tern_manager::api::serve(
        listener,
        manager,
        vec![TOKEN.into()],
        async move {
            let _ = rx.await;
        },
    ));
    // A host for VMs to be placed on.
    let client = ManagerClient::new(&base, TOKEN, T).unwrap();
    client
        .register_host(
            &serde_json::from_value(serde_json::json!({"name": "h1",
                "address": "http://198.18.0.2:7070", "capacity": {"cpus": 4, "memory_mib": 8192}}))
            .unwrap(),
        )
        .await
        .unwrap();
    Server {
        client,
        catalog,
        stop,
        _dir: dir,
    }
}

fn declared(role: FileRole, data: &[u8]) -> ImageFile {
    ImageFile {
        role,
        size: data.len() as u64,
        sha256: tern_api::catalog::hex(&Sha256::digest(data)),
        format: None,
        virtual_mib: None,
    }
}

async fn read_all(mut s: tern_api::client::Stream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(c) = s.read_chunk().await.unwrap() {
        out.extend(c);
    }
    out
}

#[tokio::test]
async fn files_travel_whole_or_not_at_all() {
    let srv = serve().await;
    let c = &srv.client;
    let kernel: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
    let initrd = b"an initramfs".to_vec();
    let new = NewImage {
        name: "tiny".parse().unwrap(),
        cmdline: "console=ttyS0".into(),
        files: vec![
            declared(FileRole::Kernel, &kernel),
            declared(FileRole::Initramfs, &initrd),
        ],
        description: "test".into(),
    };
    let img = c.add_image(&new).await.unwrap();
    assert_eq!(img.state, ImageState::Uploading);
    // Not downloadable before it arrived.
    let e = c
        .image_file("tiny", FileRole::Kernel, T)
        .await
        .err()
        .unwrap();
    assert_eq!(e.status(), Some(409), "{e}");
    // A file with other bytes than declared: refused, nothing kept.
    let mut wrong = kernel.clone();
    wrong[17] ^= 1;
    let e = c
        .upload_image_file("tiny", FileRole::Kernel, wrong.into(), T)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("SHA-256"), "{e}");
    // Longer than declared: refused as soon as it passes the size.
    let mut long = kernel.clone();
    long.push(0);
    let e = c
        .upload_image_file("tiny", FileRole::Kernel, long.into(), T)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
    let kept: Vec<_> = std::fs::read_dir(&srv.catalog)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(kept.is_empty(), "refused uploads left {kept:?}");
    // A VM cannot boot it while it uploads.
    let mut spec = VmSpec::sized(1, 128);
    spec.image = Some("tiny".into());
    let req = CreateVm {
        name: "v".parse().unwrap(),
        spec: spec.clone(),
        host: None,
        template: None,
    };
    assert_eq!(c.create_vm(&req).await.unwrap_err().status(), Some(409));

    c.upload_image_file("tiny", FileRole::Kernel, kernel.clone().into(), T)
        .await
        .unwrap();
    let img = c
        .upload_image_file("tiny", FileRole::Initramfs, initrd.clone().into(), T)
        .await
        .unwrap();
    assert_eq!(img.state, ImageState::Ready);
    let got = read_all(c.image_file("tiny", FileRole::Kernel, T).await.unwrap()).await;
    assert!(got == kernel, "the kernel comes back byte for byte");
    let e = c.image_file("tiny", FileRole::Disk, T).await.err().unwrap();
    assert_eq!(e.status(), Some(404), "{e}");

    // A template over it; a VM made from it gets its values.
    let t = Template {
        name: "small".parse().unwrap(),
        image: "tiny".parse().unwrap(),
        vcpus: 2,
        memory_mib: 256,
        disks: None,
        cmdline: "quiet".into(),
        description: String::new(),
    };
    c.create_template(&t).await.unwrap();
    let vm = c
        .create_vm(&CreateVm {
            name: "v".parse().unwrap(),
            spec: VmSpec::sized(0, 0),
            host: None,
            template: Some("small".parse().unwrap()),
        })
        .await
        .unwrap();
    assert_eq!((vm.spec.vcpus, vm.spec.memory_mib), (2, 256));
    assert_eq!(vm.spec.image.as_deref(), Some("tiny"));
    assert!(vm.spec.disks.is_empty(), "the image has no disk");

    // Refusals that create nothing.
    let before = c.vms().await.unwrap().len();
    for (req, status) in [
        (
            CreateVm {
                name: "w".parse().unwrap(),
                spec: VmSpec::sized(0, 0),
                host: None,
                template: Some("nope".parse().unwrap()),
            },
            400,
        ),
        (
            CreateVm {
                name: "w".parse().unwrap(),
                spec: VmSpec::sized(0, 0),
                host: None,
                template: None,
            },
            400,
        ),
    ] {
        let e = c.create_vm(&req).await.unwrap_err();
        assert_eq!(e.status(), Some(status), "{e}");
    }
    assert_eq!(c.vms().await.unwrap().len(), before);

    // In use: not deleted, files kept; once free, deleted with its files.
    assert_eq!(
        c.delete_image("tiny").await.unwrap_err().status(),
        Some(409)
    );
    c.delete_vm("v").await.unwrap();
    c.delete_template("small").await.unwrap();
    c.delete_image("tiny").await.unwrap();
    assert_eq!(std::fs::read_dir(&srv.catalog).unwrap().count(), 0);
    srv.stop.send(()).unwrap();
}
