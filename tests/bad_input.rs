//! Bad requests get a 4xx with `{"error": ...}` naming the problem, and the server keeps serving
//! correct answers afterwards.

use hyper::Method;
use outpost_runtime::golden::{Golden, max_abs_diff};
use outpost_tests::{Server, models_dir};
use outpost_tools::v2client;
use serde_json::json;

const CONFIG: &str =
    "[server]\nmax_body_bytes = 65536\n[[models]]\nname = \"digits-edge\"\npath = \"models/digits-edge.onnx\"\n";

fn row(values: f32) -> Vec<f32> {
    vec![values; 64]
}

/// A correct request, on a new connection, still gets the golden answer.
async fn still_serving(server: &Server) {
    let mut conn = server.conn().await;
    let golden = Golden::read(&models_dir().join("digits-edge.golden.json")).unwrap();
    let inputs: Vec<_> = golden.inputs.iter().map(|g| g.to_tensor().unwrap()).collect();
    let body = v2client::json_request(&inputs);
    let r = conn.send(Method::POST, "/v2/models/digits-edge/infer", &body.headers, body.bytes).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.error());
    let got = &v2client::outputs(&r).unwrap()[0];
    assert!(max_abs_diff(&golden.outputs[0].to_tensor().unwrap(), got) <= 1e-4);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_bad_request_is_named_and_changes_nothing() {
    let server = Server::start(CONFIG).await;
    let mut conn = server.conn().await;
    let good = |data: serde_json::Value| json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": data}]});
    let cases: Vec<(&str, String, serde_json::Value, u16, &str)> = vec![
        ("unknown model", "/v2/models/nope/infer".into(), good(json!(row(1.0))), 404, "unknown model `nope`"),
        (
            "unknown version",
            "/v2/models/digits-edge/versions/9/infer".into(),
            good(json!(row(1.0))),
            404,
            "no version `9`",
        ),
        ("missing input", "/v2/models/digits-edge/infer".into(), json!({"inputs": []}), 400, "missing input `input`"),
        (
            "extra input",
            "/v2/models/digits-edge/infer".into(),
            json!({"inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row(1.0)},
                {"name": "mask", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
            400,
            "unknown input `mask`",
        ),
        (
            "wrong dtype",
            "/v2/models/digits-edge/infer".into(),
            json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT32", "data": vec![1; 64]}]}),
            400,
            "expected datatype FP32, got INT32",
        ),
        (
            "wrong shape",
            "/v2/models/digits-edge/infer".into(),
            json!({"inputs": [{"name": "input", "shape": [2, 32], "datatype": "FP32", "data": row(1.0)}]}),
            400,
            "does not match the model's [-1, 64]",
        ),
        (
            "wrong element count",
            "/v2/models/digits-edge/infer".into(),
            json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![1.0; 63]}]}),
            400,
            "holds 64 elements but `data` has 63",
        ),
        (
            "unknown output",
            "/v2/models/digits-edge/infer".into(),
            json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row(1.0)}], "outputs": [{"name": "logits"}]}),
            400,
            "unknown output `logits`",
        ),
        (
            "string where a number goes",
            "/v2/models/digits-edge/infer".into(),
            good(json!(vec!["1"; 64])),
            400,
            "expected a number",
        ),
    ];
    for (what, path, body, status, message) in cases {
        let r = conn.post_json(&path, &body).await.unwrap();
        assert_eq!(r.status, status, "{what}: {}", r.error());
        assert!(r.error().contains(message), "{what}: error {:?} should say {message:?}", r.error());
        still_serving(&server).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_bodies_and_binary_framing_are_refused() {
    let server = Server::start(CONFIG).await;
    let mut conn = server.conn().await;
    let send = |headers: Vec<(&'static str, String)>, body: Vec<u8>| (headers, body);
    let header =
        r#"{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","parameters":{"binary_data_size":256}}]}"#;
    let framed = |binary_len: usize, header_len: usize| {
        let mut b = header.as_bytes().to_vec();
        b.extend(vec![0u8; binary_len]);
        send(vec![("inference-header-content-length", header_len.to_string())], b)
    };
    let nan = {
        let mut b = header.as_bytes().to_vec();
        b.extend(std::iter::repeat_n(f32::NAN.to_le_bytes(), 64).flatten());
        send(vec![("inference-header-content-length", header.len().to_string())], b)
    };
    let cases = vec![
        ("malformed JSON", send(vec![], b"{\"inputs\": [".to_vec()), 400, "malformed request JSON"),
        ("not JSON at all", send(vec![], vec![0xff, 0xfe, 0x00]), 400, "malformed request JSON"),
        ("binary data too short", framed(255, header.len()), 400, "only 255 bytes of binary data remain"),
        ("binary data too long", framed(260, header.len()), 400, "4 bytes of binary data follow"),
        ("header length past the body", framed(256, 100_000), 400, "Inference-Header-Content-Length is 100000"),
        ("header length cuts the JSON", framed(256, 20), 400, "malformed request JSON"),
        (
            "header length not a number",
            send(vec![("inference-header-content-length", "ten".into())], header.as_bytes().to_vec()),
            400,
            "must be a non-negative integer",
        ),
        ("non-finite values", nan, 400, "element 0 is NaN or infinite"),
        ("oversized body", send(vec![], vec![b' '; 70_000]), 413, "larger than the 65536 bytes allowed"),
    ];
    for (what, (headers, body), status, message) in cases {
        let r = conn.send(Method::POST, "/v2/models/digits-edge/infer", &headers, body).await.unwrap();
        assert_eq!(r.status, status, "{what}: {}", r.error());
        assert!(r.error().contains(message), "{what}: error {:?} should say {message:?}", r.error());
        still_serving(&server).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_chunked_body_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(CONFIG).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"POST /v2/models/digits-edge/infer HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n").await.unwrap();
    let chunk = vec![b' '; 8192];
    for _ in 0..10 {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.is_err() {
            break;
        }
        let _ = s.write_all(&chunk).await;
        let _ = s.write_all(b"\r\n").await;
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than the 65536 bytes allowed"), "{answer}");
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_and_methods_answer_json() {
    let server = Server::start(CONFIG).await;
    let mut conn = server.conn().await;
    let r = conn.get("/v2/nothing").await.unwrap();
    assert_eq!(r.status, 404);
    assert!(r.error().contains("no route for GET /v2/nothing"));
    let r = conn.get("/v2/models/digits-edge/infer").await.unwrap();
    assert_eq!(r.status, 405);
    assert!(r.error().contains("GET is not allowed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_guards_everything_but_liveness() {
    let token = "0123456789abcdef-token";
    let server =
        Server::start(&format!("[server]\nauth_token = \"{token}\"\n{}", CONFIG.replace("[server]\n", ""))).await;
    let mut conn = server.conn().await;
    assert_eq!(conn.get("/v2/health/live").await.unwrap().status, 200);
    let r = conn.get("/v2/models/digits-edge").await.unwrap();
    assert_eq!(r.status, 401);
    assert!(r.error().contains("bearer token"));
    let wrong = conn
        .send(Method::GET, "/v2/models/digits-edge", &[("authorization", "Bearer nope".into())], vec![])
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    let right = conn
        .send(Method::GET, "/v2/models/digits-edge", &[("authorization", format!("Bearer {token}"))], vec![])
        .await
        .unwrap();
    assert_eq!(right.status, 200);
}

/// What a web page in a browser on the box can make the daemon do: nothing (DNS rebinding,
/// cross-site requests and form posts are refused, and the model stays loaded).
#[tokio::test(flavor = "multi_thread")]
async fn web_pages_cannot_drive_the_daemon() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(CONFIG).await;
    let unload = "/v2/repository/models/digits-edge/unload";

    // A rebound name: same-origin for the browser, but the Host says whose page it is.
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let port = server.addr.port();
    let request = format!(
        "POST {unload} HTTP/1.1\r\nhost: rebind.evil.example:{port}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("server.allowed_hosts"), "{answer}");

    let mut conn = server.conn().await;
    let cross = [("origin", "http://evil.example".to_owned())];
    let r = conn.send(Method::POST, unload, &cross, vec![]).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.error());
    assert!(r.error().contains("cross-origin"), "{}", r.error());
    let form = [("content-type", "text/plain;charset=UTF-8".to_owned())];
    let r = conn.send(Method::POST, unload, &form, "{}").await.unwrap();
    assert_eq!(r.status, 415, "{}", r.error());
    still_serving(&server).await;

    // The daemon's own origin and a client without one (tritonclient, curl) are served.
    let own = [("origin", format!("http://{}", server.addr))];
    let r = conn.send(Method::POST, "/v2/repository/models/digits-edge/load", &own, vec![]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.error());
    let r = conn.send(Method::POST, unload, &[], vec![]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.error());
    assert_ne!(conn.get("/v2/models/digits-edge/ready").await.unwrap().status, 200, "unloaded by a plain client");
}
