//! A real browser for the web page's tests: Debian's chromium, headless, driven through
//! chromedriver's W3C WebDriver protocol on loopback. Both are installed by
//! `scripts/setup.sh --test`; a missing one fails the test, it is never skipped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{self, free_port, patience};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C name of an element reference in WebDriver JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// An HTTP client for loopback only: no proxy from the environment, errors as statuses.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// A chromedriver process and one browser session; both end when dropped.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: ureq::Agent,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A headless chromium of 1280x1000 CSS pixels.
    pub fn start() -> Self {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: scripts/setup.sh --test installs chromium and chromium-driver"
            );
        }
        let port = free_port();
        let driver = util::spawn(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = agent();
        let t = Instant::now();
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--no-proxy-server",
                    "--window-size=1280,1000", "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
            _profile: profile,
        };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        b
    }

    /// One WebDriver command; its `value`, or a panic naming the command and the error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let res = match (method, body) {
            ("GET", _) => self.http.get(&url).call(),
            ("DELETE", _) => self.http.delete(&url).call(),
            (_, Some(b)) => self.http.post(&url).send_json(b),
            (_, None) => self.http.post(&url).send_json(json!({})),
        };
        let mut res = res.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = res.status();
        let v: Value = res
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_json()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(
            status.is_success(),
            "{method} {path}: {status} {}",
            v["value"]
        );
        v["value"].clone()
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub fn script(&self, script: &str, args: Vec<Value>) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Waits until `condition` (a JavaScript expression) is true in the page.
    pub fn wait(&self, what: &str, condition: &str, limit: Duration) {
        let t = Instant::now();
        loop {
            if self.script(&format!("return !!({condition});"), vec![]) == Value::Bool(true) {
                return;
            }
            assert!(
                t.elapsed() < patience(limit),
                "timed out waiting for {what} ({condition}); page text: {}",
                self.script("return document.body.innerText;", vec![])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The element `css` selects, once there is one.
    pub fn find(&self, css: &str) -> Element<'_> {
        self.wait(
            css,
            &format!("document.querySelector({css:?})"),
            Duration::from_secs(20),
        );
        let v = self.call(
            "POST",
            &self.s("/element"),
            Some(json!({ "using": "css selector", "value": css })),
        );
        Element {
            browser: self,
            id: v[ELEMENT]
                .as_str()
                .unwrap_or_else(|| panic!("{css}: not an element reference: {v}"))
                .to_owned(),
        }
    }

    /// Clicks at `points`, in CSS pixels of the viewport, one after another.
    pub fn click_at(&self, points: &[(f64, f64)]) {
        let mut actions = Vec::new();
        for (x, y) in points {
            actions.push(
                json!({"type": "pointerMove", "duration": 0, "origin": "viewport",
                "x": x.round() as i64, "y": y.round() as i64}),
            );
            actions.push(json!({"type": "pointerDown", "button": 0}));
            actions.push(json!({"type": "pointerUp", "button": 0}));
            actions.push(json!({"type": "pause", "duration": 50}));
        }
        self.pointer(actions);
    }

    /// Presses at `from` and releases at `to`, moving in steps as a hand does.
    pub fn drag(&self, from: (f64, f64), to: (f64, f64)) {
        let mut actions = vec![
            json!({"type": "pointerMove", "duration": 0, "origin": "viewport",
                "x": from.0.round() as i64, "y": from.1.round() as i64}),
            json!({"type": "pointerDown", "button": 0}),
        ];
        for i in 1..=5 {
            let f = f64::from(i) / 5.0;
            actions.push(
                json!({"type": "pointerMove", "duration": 20, "origin": "viewport",
                "x": (from.0 + (to.0 - from.0) * f).round() as i64,
                "y": (from.1 + (to.1 - from.1) * f).round() as i64}),
            );
        }
        actions.push(json!({"type": "pointerUp", "button": 0}));
        self.pointer(actions);
    }

    fn pointer(&self, actions: Vec<Value>) {
        self.call(
            "POST",
            &self.s("/actions"),
            Some(json!({"actions": [{"type": "pointer", "id": "mouse",
                "parameters": {"pointerType": "mouse"}, "actions": actions}]})),
        );
    }

    /// The viewport rectangle (x, y, width, height) of the element `css` selects, after
    /// scrolling it into view.
    pub fn rect(&self, css: &str) -> (f64, f64, f64, f64) {
        let v = self.script(
            "const e = document.querySelector(arguments[0]); e.scrollIntoView({block: 'center'}); \
             const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height];",
            vec![json!(css)],
        );
        let n = |i: usize| v[i].as_f64().unwrap();
        (n(0), n(1), n(2), n(3))
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.call("GET", &self.s("/screenshot"), None);
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .http
                .delete(format!("{}{}", self.base, self.s("")))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// An element of the page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Element<'_> {
    fn path(&self, rest: &str) -> String {
        self.browser.s(&format!("/element/{}{rest}", self.id))
    }

    pub fn click(&self) {
        self.browser.call("POST", &self.path("/click"), None);
    }

    pub fn clear(&self) {
        self.browser.call("POST", &self.path("/clear"), None);
    }

    pub fn type_text(&self, text: &str) {
        self.browser
            .call("POST", &self.path("/value"), Some(json!({ "text": text })));
    }

    pub fn text(&self) -> String {
        self.browser
            .call("GET", &self.path("/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}
