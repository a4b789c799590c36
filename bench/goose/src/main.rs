//! The Goose peer of `bench/bots.sh throughput`: the shop flow of
//! `bench/bots/shop-throughput.yaml`, without think time, as one Goose transaction.
//!
//! login (extract the token) → browse (extract the first product id, check the page is
//! not empty) → add to cart → checkout, each checked for its status (Goose counts a
//! status of 400 or more as a failed request; a missing token or product fails the
//! request explicitly). Run it with Goose's own flags, e.g.
//! `shop-goose -H http://127.0.0.1:18280 -u 64 -s 1 -t 30s --report-file report.json`.

use goose::goose::GooseResponse;
use goose::prelude::*;
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<(), GooseError> {
    GooseAttack::initialize()?
        .register_scenario(scenario!("Shop").register_transaction(transaction!(shop_flow)))
        .execute()
        .await?;
    Ok(())
}

/// The body of a response as JSON, or the request marked failed with `why`.
async fn json_of(user: &mut GooseUser, mut goose: GooseResponse, why: &str) -> Option<Value> {
    let body = match goose.response {
        Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
        _ => None,
    };
    if body.is_none() {
        let _ = user.set_failure(why, &mut goose.request, None, None);
    }
    body
}

async fn shop_flow(user: &mut GooseUser) -> TransactionResult {
    let id = user.weighted_users_index;

    let login = user
        .post_json("/api/login", &json!({ "user": format!("goose-{id}") }))
        .await?;
    let Some(body) = json_of(user, login, "login: no JSON body").await else {
        return Ok(());
    };
    let Some(token) = body.get("token").and_then(Value::as_str).map(str::to_owned) else {
        return Ok(());
    };

    let path = format!("/api/products?page={}", id % 5 + 1);
    let builder = user
        .get_request_builder(&GooseMethod::Get, &path)?
        .bearer_auth(&token);
    let browse = user
        .request(
            GooseRequest::builder()
                .path(path.as_str())
                .name("browse")
                .set_request_builder(builder)
                .build(),
        )
        .await?;
    let mut browse_metric = browse.request.clone();
    let Some(page) = json_of(user, browse, "browse: no JSON body").await else {
        return Ok(());
    };
    let items = page.get("items").and_then(Value::as_array);
    let Some(product) = items
        .and_then(|i| i.first())
        .and_then(|p| p.get("id"))
        .cloned()
    else {
        return user.set_failure("browse: no items", &mut browse_metric, None, None);
    };

    let builder = user
        .get_request_builder(&GooseMethod::Post, "/api/cart")?
        .bearer_auth(&token)
        .json(&json!({ "product": product.to_string(), "quantity": 1 }));
    user.request(
        GooseRequest::builder()
            .path("/api/cart")
            .name("addToCart")
            .set_request_builder(builder)
            .build(),
    )
    .await?;

    let builder = user
        .get_request_builder(&GooseMethod::Post, "/api/checkout")?
        .bearer_auth(&token);
    user.request(
        GooseRequest::builder()
            .path("/api/checkout")
            .name("checkout")
            .set_request_builder(builder)
            .build(),
    )
    .await?;
    Ok(())
}
