from hello_api.main import self_test


def test_self_test_answers_over_loopback() -> None:
    result = self_test()
    assert result["responses"] == {
        "/health": {"status": "ok"},
        "/hello/world": {"message": "Hello, world!"},
    }
