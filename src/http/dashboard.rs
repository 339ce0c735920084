//! The dashboard's routes and pages: plain server-rendered HTML (maud escapes every
//! value), no JavaScript.

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::header::{CACHE_CONTROL, COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use super::AppState;
use crate::dashboard::{Outcome, Page, View};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard/instances/{instance_id}", get(visit))
        .route("/dashboard/callback", get(callback))
        .route("/dashboard/logout", get(logout))
        .route("/dashboard/logged-out", get(logged_out))
}

fn cookie_header(headers: &HeaderMap) -> Option<String> {
    let all: Vec<&str> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!all.is_empty()).then(|| all.join("; "))
}

async fn visit(
    State(state): State<AppState>,
    Path(instance_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(dashboard) = state.dashboard.as_ref() else {
        return not_configured();
    };
    let path = match query {
        Some(q) => format!("/dashboard/instances/{instance_id}?{q}"),
        None => format!("/dashboard/instances/{instance_id}"),
    };
    respond(
        dashboard
            .visit(&instance_id, &path, cookie_header(&headers).as_deref())
            .await,
    )
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

async fn callback(
    State(state): State<AppState>,
    Query(q): Query<CallbackQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(dashboard) = state.dashboard.as_ref() else {
        return not_configured();
    };
    let outcome = dashboard
        .callback(
            q.code.as_deref(),
            q.state.as_deref(),
            q.error.as_deref(),
            cookie_header(&headers).as_deref(),
        )
        .await;
    respond(outcome)
}

#[derive(Deserialize)]
struct LogoutQuery {
    return_to: Option<String>,
}

async fn logout(
    State(state): State<AppState>,
    Query(q): Query<LogoutQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(dashboard) = state.dashboard.as_ref() else {
        return not_configured();
    };
    respond(dashboard.logout(q.return_to.as_deref(), cookie_header(&headers).as_deref()))
}

async fn logged_out() -> Response {
    page(
        StatusCode::OK,
        "Logged out",
        html! { p { "You are logged out of the service dashboards." } },
    )
}

fn not_configured() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "No dashboards",
        html! { p { "This broker serves no dashboards." } },
    )
}

fn respond(outcome: Outcome) -> Response {
    let (mut response, cookies) = match outcome {
        Outcome::Redirect { location, cookies } => {
            let mut r = StatusCode::FOUND.into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(LOCATION, v);
            }
            (r, cookies)
        }
        Outcome::Page {
            status,
            page: content,
            cookies,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let r = match content {
                Page::Dashboard(view) => page(status, &view.service_name, dashboard(&view)),
                Page::Message { title, text } => page(status, &title, html! { p { (text) } }),
            };
            (r, cookies)
        }
    };
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            response.headers_mut().append(SET_COOKIE, v);
        }
    }
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn page(status: StatusCode, title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Brokerage" }
                style { (STYLE) }
            }
            body {
                header { "Brokerage service dashboard" }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    (status, markup).into_response()
}

fn dashboard(view: &View) -> Markup {
    html! {
        p.user { "Signed in as " strong { (view.user_name) } " · " a href=(view.logout_path) { "Log out" } }
        section {
            h2 { "Instance" }
            dl {
                dt { "Service" } dd #service { (view.service_name) }
                dt { "Plan" } dd #plan { (view.plan_name) }
                dt { "State" } dd #state { (view.state) }
                dt { "Created" } dd { (view.created_at.format("%Y-%m-%d %H:%M:%S UTC")) }
                dt { "Instance id" } dd { code { (view.instance_id) } }
                @for (label, value) in &view.details {
                    dt { (label) } dd { (value) }
                }
            }
        }
        @if let Some(lines) = &view.logs {
            section {
                h2 { "Recent logs" }
                // The page reloads itself, so new lines appear without a click.
                meta http-equiv="refresh" content="3";
                @if lines.is_empty() {
                    p #no-logs { "No log lines yet. Bind an app: its logs arrive here." }
                } @else {
                    table #logs {
                        thead { tr { th { "Time" } th { "App" } th { "Process" } th { "Message" } } }
                        tbody {
                            @for l in lines {
                                tr {
                                    td { (l.at) }
                                    td { (if l.host.is_empty() { &l.app } else { &l.host }) }
                                    td.process { (l.process) }
                                    td.text { (l.text) }
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Bindings" }
            @if view.bindings.is_empty() {
                p { "No application is bound to this instance." }
            } @else {
                table #bindings {
                    thead { tr { th { "Binding" } th { "Application" } th { "Created" } } }
                    tbody {
                        @for b in &view.bindings {
                            tr {
                                td { code { (b.id) } }
                                td { (b.app_guid.as_deref().unwrap_or("—")) }
                                td { (b.created_at.format("%Y-%m-%d %H:%M UTC")) }
                            }
                        }
                    }
                }
            }
        }
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}\
header{background:#0b3d91;color:#fff;padding:.8rem 1.5rem;font-weight:600}\
main{max-width:52rem;margin:1.5rem auto;padding:0 1.5rem}\
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:1rem 1.5rem;margin:1rem 0}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.4rem 1.5rem}dt{color:#555}dd{margin:0}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #eee}\
.user{color:#555}";
