//! Certificates for the TLS tests, made with the `openssl` command: a CA, and a server
//! certificate for 127.0.0.1 signed by it.

use std::path::{Path, PathBuf};

/// Runs `openssl ARGS` (split on spaces) in `dir`, failing the test with its output if it fails.
pub fn openssl(dir: &Path, args: &str) {
    let out = std::process::Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
}

const EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

/// A CA in `dir` (`NAME.pem`, `NAME.key`).
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(dir, &format!("req -x509 {EC_KEY} -days 2 -subj /CN={name} -keyout {name}.key -out {name}.pem"));
    dir.join(format!("{name}.pem"))
}

/// A server certificate for 127.0.0.1 signed by the CA `ca` in `dir`: (`NAME.pem`, `NAME.key`).
pub fn server_cert(dir: &Path, ca: &str, name: &str) -> (PathBuf, PathBuf) {
    openssl(dir, &format!("req {EC_KEY} -subj /CN={name} -keyout {name}.key -out {name}.csr"));
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -days 2 \
             -extfile {name}.ext -out {name}.pem"
        ),
    );
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}
