from schemas.sessions import merge_storage_state


def cookie(name: str, value: str, domain: str = ".board.example.com") -> dict:
    return {"name": name, "value": value, "domain": domain, "path": "/"}


def test_an_upload_keeps_cookies_it_lacks_and_overrides_those_it_has() -> None:
    kept = {"cookies": [cookie("sid", "old"), cookie("login_once", "x")], "origins": []}
    uploaded = {"cookies": [cookie("sid", "new"), cookie("sid", "other", domain="cdn.example.com")]}
    merged = merge_storage_state(kept, uploaded)
    values = {(c["name"], c["domain"]): c["value"] for c in merged["cookies"]}
    assert values == {
        ("sid", ".board.example.com"): "new",
        ("login_once", ".board.example.com"): "x",
        ("sid", "cdn.example.com"): "other",
    }


def test_origins_merge_their_local_storage_by_name() -> None:
    kept = {
        "origins": [
            {
                "origin": "https://a",
                "localStorage": [{"name": "k", "value": "1"}, {"name": "j", "value": "2"}],
            }
        ]
    }
    uploaded = {"origins": [{"origin": "https://a", "localStorage": [{"name": "k", "value": "3"}]},
                            {"origin": "https://b", "localStorage": []}]}  # fmt: skip
    merged = merge_storage_state(kept, uploaded)
    by_origin = {
        o["origin"]: {e["name"]: e["value"] for e in o["localStorage"]} for o in merged["origins"]
    }
    assert by_origin == {"https://a": {"k": "3", "j": "2"}, "https://b": {}}


def test_the_first_upload_is_the_session() -> None:
    assert merge_storage_state(None, {"cookies": [cookie("a", "1")]}) == {
        "cookies": [cookie("a", "1")],
        "origins": [],
    }
