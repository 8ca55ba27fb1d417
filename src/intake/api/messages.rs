//! `POST /v1/messages`: one transactional message, stored as a campaign of one recipient (the
//! same validation and commit as `POST /v1/campaigns`, with `to` and `vars`).

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;

use super::{ApiResult, AppState};
use crate::store::campaign::CampaignKind;

pub(super) async fn send(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    super::campaigns::compose(s, headers, body, CampaignKind::Transactional).await
}
