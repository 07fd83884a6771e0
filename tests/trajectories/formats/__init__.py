import pytest

# `checks` is not a test module; this keeps pytest's detailed messages for its asserts.
pytest.register_assert_rewrite("tests.trajectories.formats.checks")
