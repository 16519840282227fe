//! The catalogue's routes (`docs/images.md`): images and their files, templates.
//!
//! An image is recorded first (`POST /v1/images`, each file's size and SHA-256), then
//! each file is uploaded (`PUT /v1/images/{name}/files/{role}`): the body is streamed to
//! a temporary file in the catalogue directory, refused as soon as it passes the
//! declared size, hashed on the way, and renamed into place only if size and hash match,
//! so a file in the catalogue is always whole. Hosts fetch files with
//! `GET /v1/images/{name}/files/{role}` and their own certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body as RawBody;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tern_api::catalog::{FileRole, Image, ImageFile, NewImage, Template};
use tern_model::{ImageName, TemplateName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::{ApiError, ApiResult, Body, ErrorBody as Error};
use super::{check_token, execute, not_a_host, reply, App, AppState, NamePath};
use crate::decide::Command;

/// The `{name}` of an image route.
pub type ImagePath = NamePath<ImageName>;
/// The `{name}` of a template route.
pub type TemplatePath = NamePath<TemplateName>;

/// How long one upload may take before it is dropped: a 64 GiB file at 100 MB/s.
const UPLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

fn catalog_dir(app: &App) -> ApiResult<&Path> {
    app.manager.catalog_dir().ok_or_else(|| {
        ApiError::Unavailable(
            "this manager keeps no image files (it runs in-process simulated hosts)".into(),
        )
    })
}

fn image(app: &App, name: &str) -> ApiResult<Image> {
    app.manager
        .read(|s| s.images.get(name).cloned())
        .ok_or_else(|| crate::Error::UnknownImage(name.to_owned()).into())
}

fn role(s: &str) -> ApiResult<FileRole> {
    FileRole::parse(s).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "file role {s:?}: give one of kernel, initramfs, disk"
        ))
    })
}

/// The file of `role` an image declared, or 404.
fn declared(image: &Image, role: FileRole) -> ApiResult<ImageFile> {
    image.file(role).cloned().ok_or_else(|| {
        ApiError::NotFound(format!(
            "image {:?} has no {} file",
            image.name,
            role.as_str()
        ))
    })
}

#[utoipa::path(get, path = "/v1/images", operation_id = "listImages",
    summary = "The catalogue's images.",
    responses((status = 200, description = "images", body = Vec<Image>)))]
pub(super) async fn list_images(State(app): AppState) -> Response {
    Json(
        app.manager
            .read(|s| s.images.values().cloned().collect::<Vec<_>>()),
    )
    .into_response()
}

#[utoipa::path(post, path = "/v1/images", operation_id = "addImage",
    summary = "Record an image; upload its files next.",
    request_body(content = NewImage, example = json!({"name": "tiny", "cmdline": "console=ttyS0",
        "files": [{"role": "kernel", "size": 5, "sha256": "f2ca1bb6c7e907d06dafe4687e579fce76b37e4e93b7605022da52e6ccc26fd2"}]})),
    responses((status = 201, description = "the image, uploading", body = Image),
        (status = 400, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
pub(super) async fn add_image(
    State(app): AppState,
    Body(b): Body<NewImage>,
) -> ApiResult<Response> {
    catalog_dir(&app)?;
    Ok(reply(
        StatusCode::CREATED,
        execute(&app, Command::AddImage(b)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/images/{name}", operation_id = "showImage", summary = "One image.",
    params(("name" = String, Path, description = "the image's name", example = "minimal")),
    responses((status = 200, description = "the image", body = Image), (status = 404, description = "error", body = Error)))]
pub(super) async fn show_image(
    State(app): AppState,
    NamePath(name, _): ImagePath,
) -> ApiResult<Response> {
    Ok(Json(image(&app, &name)?).into_response())
}

#[utoipa::path(delete, path = "/v1/images/{name}", operation_id = "deleteImage",
    summary = "Delete an image no template or VM uses, and its files.",
    params(("name" = String, Path, description = "the image's name", example = "minimal")),
    responses((status = 200, description = "the deleted image", body = Image),
        (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
pub(super) async fn delete_image(
    State(app): AppState,
    NamePath(name, _): ImagePath,
) -> ApiResult<Response> {
    let r = execute(&app, Command::DeleteImage { name }).await?;
    if let (crate::decide::Reply::Image(i), Ok(dir)) = (&r, catalog_dir(&app)) {
        for f in &i.files {
            let _ = tokio::fs::remove_file(dir.join(f.stored_name(&i.name))).await;
        }
    }
    Ok(reply(StatusCode::OK, r))
}

#[utoipa::path(put, path = "/v1/images/{name}/files/{role}", operation_id = "uploadImageFile",
    summary = "Upload one file of an image; kept only if its size and SHA-256 match what the image declared.",
    params(("name" = String, Path, description = "the image's name", example = "minimal"),
        ("role" = FileRole, Path, description = "which file")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "the image", body = Image),
        (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error)))]
pub(super) async fn upload_file(
    State(app): AppState,
    UrlPath((name, role_s)): UrlPath<(String, String)>,
    req: Request,
) -> ApiResult<Response> {
    // The user routes' check, made here: this path's GET is a host's too.
    check_token(&app.tokens, req.headers())?;
    not_a_host(req.extensions().get::<tern_pki::Secure>())?;
    name.parse::<ImageName>().map_err(crate::Error::BadName)?;
    let role = role(&role_s)?;
    let dir = catalog_dir(&app)?.to_path_buf();
    let img = image(&app, &name)?;
    let want = declared(&img, role)?;
    let dest = dir.join(want.stored_name(&name));
    if !img.received.contains(&role) || !dest.exists() {
        let body = req.into_body();
        tokio::time::timeout(UPLOAD_TIMEOUT, receive(body, &dir, &dest, &want))
            .await
            .map_err(|_| {
                ApiError::BadRequest(format!(
                    "upload of {} took over {} s; retry",
                    role.as_str(),
                    UPLOAD_TIMEOUT.as_secs()
                ))
            })??;
    }
    let r = execute(&app, Command::ImageFileReceived { image: name, role }).await?;
    Ok(reply(StatusCode::OK, r))
}

/// Streams `body` into a temporary file beside `dest`, then renames it there if it
/// has exactly the declared size and hash; otherwise removes it and says what differed.
async fn receive(body: RawBody, dir: &Path, dest: &Path, want: &ImageFile) -> ApiResult<()> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| ApiError::Internal(format!("catalogue directory {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(".upload-{}-{}", std::process::id(), rand_suffix()));
    let r = write_checked(body, &tmp, want).await;
    match r {
        Ok(()) => tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| ApiError::Internal(format!("catalogue file {}: {e}", dest.display()))),
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

async fn write_checked(body: RawBody, tmp: &Path, want: &ImageFile) -> ApiResult<()> {
    let io =
        |e: std::io::Error| ApiError::Internal(format!("catalogue file {}: {e}", tmp.display()));
    let mut f = tokio::fs::File::create(tmp).await.map_err(io)?;
    let mut hash = Sha256::new();
    let mut got = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("upload broke off: {e}")))?;
        got += chunk.len() as u64;
        if got > want.size {
            return Err(ApiError::BadRequest(format!(
                "{} file is larger than the {} bytes the image declared",
                want.role.as_str(),
                want.size
            )));
        }
        hash.update(&chunk);
        f.write_all(&chunk).await.map_err(io)?;
    }
    f.sync_all().await.map_err(io)?;
    if got != want.size {
        return Err(ApiError::BadRequest(format!(
            "{} file has {got} bytes, the image declared {}",
            want.role.as_str(),
            want.size
        )));
    }
    let sha = tern_api::catalog::hex(&hash.finalize());
    if sha != want.sha256 {
        return Err(ApiError::BadRequest(format!(
            "{} file has SHA-256 {sha}, the image declared {}",
            want.role.as_str(),
            want.sha256
        )));
    }
    Ok(())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// Who may download an image file (pure): any caller with a client certificate of the
/// cluster CA (a host fetching what it must boot), else the bearer token.
fn download_caller(app: &App, req: &Request) -> ApiResult<()> {
    let secure = req.extensions().get::<tern_pki::Secure>();
    match secure.and_then(|s| s.peer.as_ref()) {
        Some(_) => Ok(()),
        None => check_token(&app.tokens, req.headers()),
    }
}

#[utoipa::path(get, path = "/v1/images/{name}/files/{role}", operation_id = "downloadImageFile",
    summary = "One file of a ready image, as a host copies it into its store; a host's own certificate may fetch it.",
    params(("name" = String, Path, description = "the image's name", example = "minimal"),
        ("role" = FileRole, Path, description = "which file")),
    responses((status = 200, description = "the file", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
pub(super) async fn download_file(
    State(app): AppState,
    UrlPath((name, role_s)): UrlPath<(String, String)>,
    req: Request,
) -> ApiResult<Response> {
    download_caller(&app, &req)?;
    name.parse::<ImageName>().map_err(crate::Error::BadName)?;
    let role = role(&role_s)?;
    let dir: PathBuf = catalog_dir(&app)?.to_path_buf();
    let img = image(&app, &name)?;
    let want = declared(&img, role)?;
    if !img.received.contains(&role) {
        return Err(crate::Error::Conflict(format!(
            "image {name:?}: its {} file has not been uploaded yet",
            role.as_str()
        ))
        .into());
    }
    let path = dir.join(want.stored_name(&name));
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("catalogue file {}: {e}", path.display())))?;
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, want.size.to_string()),
        ],
        RawBody::from_stream(stream),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/templates", operation_id = "listTemplates",
    summary = "The catalogue's templates.",
    responses((status = 200, description = "templates", body = Vec<Template>)))]
pub(super) async fn list_templates(State(app): AppState) -> Response {
    Json(
        app.manager
            .read(|s| s.templates.values().cloned().collect::<Vec<_>>()),
    )
    .into_response()
}

#[utoipa::path(post, path = "/v1/templates", operation_id = "createTemplate",
    summary = "Create a template over an image; `default` is the one VMs made without a template get.",
    request_body(content = Template, example = json!({"name": "small", "image": "base", "vcpus": 1, "memory_mib": 256})),
    responses((status = 201, description = "the template", body = Template),
        (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error),
        (status = 409, description = "error", body = Error)))]
pub(super) async fn create_template(
    State(app): AppState,
    Body(b): Body<Template>,
) -> ApiResult<Response> {
    Ok(reply(
        StatusCode::CREATED,
        execute(&app, Command::CreateTemplate(b)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/templates/{name}", operation_id = "showTemplate", summary = "One template.",
    params(("name" = String, Path, description = "the template's name", example = "debian")),
    responses((status = 200, description = "the template", body = Template), (status = 404, description = "error", body = Error)))]
pub(super) async fn show_template(
    State(app): AppState,
    NamePath(name, _): TemplatePath,
) -> ApiResult<Response> {
    app.manager
        .read(|s| s.templates.get(&name).cloned())
        .map(|t| Json(t).into_response())
        .ok_or_else(|| crate::Error::UnknownTemplate(name).into())
}

#[utoipa::path(delete, path = "/v1/templates/{name}", operation_id = "deleteTemplate",
    summary = "Delete a template; VMs made from it keep their values.",
    params(("name" = String, Path, description = "the template's name", example = "debian")),
    responses((status = 200, description = "the deleted template", body = Template), (status = 404, description = "error", body = Error)))]
pub(super) async fn delete_template(
    State(app): AppState,
    NamePath(name, _): TemplatePath,
) -> ApiResult<Response> {
    Ok(reply(
        StatusCode::OK,
        execute(&app, Command::DeleteTemplate { name }).await?,
    ))
}

/// The catalogue's routes that take the bearer token.
pub(super) fn secured_routes() -> axum::Router<Arc<App>> {
    use axum::routing::get;
    axum::Router::new()
        .route("/v1/images", get(list_images).post(add_image))
        .route("/v1/images/:name", get(show_image).delete(delete_image))
        .route("/v1/templates", get(list_templates).post(create_template))
        .route(
            "/v1/templates/:name",
            get(show_template).delete(delete_template),
        )
}

/// The file routes, which check their callers themselves: a host may download by
/// its certificate, only an API user may upload.
pub(super) fn file_routes() -> axum::Router<Arc<App>> {
    axum::Router::new().route(
        "/v1/images/:name/files/:role",
        axum::routing::get(download_file).put(upload_file),
    )
}
