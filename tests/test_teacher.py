"""The teacher client's own rules, without a server: the rate limit spaces request starts,
which statuses are retried, where the API key comes from, and settings no run could use.
(Requests against a real server: test_synthesize_teacher.py.)"""

import asyncio
import time

import pytest

from prealign_jax.data import teacher


def test_the_rate_limit_spaces_request_starts():
    async def starts(limit, n):
        """Seconds from before the first request to each start, in order."""
        begin, out = time.monotonic(), []

        async def one():
            await limit.wait()
            out.append(time.monotonic() - begin)
        await asyncio.gather(*(one() for _ in range(n)))
        return sorted(out)

    times = asyncio.run(starts(teacher._RateLimit(50.0), 6))
    # the k-th start is scheduled k/50 s after the first call, and a sleep never ends early
    assert all(t >= k / 50 - 1e-6 for k, t in enumerate(times))
    assert len(asyncio.run(starts(teacher._RateLimit(0.0), 3))) == 3  # 0: no limit


@pytest.mark.parametrize("status, cause", [(429, "429"), (500, "5xx"), (503, "5xx"),
                                           (408, "408"), (400, None), (401, None),
                                           (404, None), (422, None)])
def test_which_statuses_are_retried(status, cause):
    assert teacher._transient_status(status) == cause


def test_the_api_key_comes_from_the_file_or_the_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-env")
    assert teacher.TeacherConfig("http://h/v1", api_key_env="MY_KEY").api_key() == "sk-env"
    (tmp_path / "key").write_text("sk-file\n")
    config = teacher.TeacherConfig("http://h/v1", api_key_env="MY_KEY",
                                   api_key_file=str(tmp_path / "key"))
    assert config.api_key() == "sk-file"
    monkeypatch.delenv("MY_KEY")
    assert teacher.TeacherConfig("http://h/v1", api_key_env="MY_KEY").api_key() == "EMPTY"
    with pytest.raises(teacher.TeacherError, match="no such file"):
        teacher.TeacherConfig("http://h/v1", api_key_file=str(tmp_path / "nope")).api_key()


@pytest.mark.parametrize("field, value, needle", [
    ("api", "responses", "--teacher_api=responses"), ("url", "localhost:8000", "API base"),
    ("concurrency", 0, "concurrency=0"), ("timeout_s", 0.0, "timeout_s=0.0"),
    ("max_retries", -1, "max_retries=-1"), ("requests_per_s", -2.0, "requests_per_s"),
    ("temperature", -1.0, "temperature=-1.0"), ("top_p", 0.0, "top_p=0.0"),
    ("timeout_s", float("inf"), "timeout_s=inf"), ("temperature", float("nan"), "nan"),
])
def test_settings_no_run_could_use_are_one_line_errors(field, value, needle):
    fields = {"url": "http://h/v1", field: value}
    with pytest.raises(teacher.TeacherError, match=needle) as e:
        teacher.TeacherConfig(**fields).check()
    assert "\n" not in str(e.value)
