"""A clock that moves only when a test moves it, for code that takes ``clock=`` (SensorSync, the replica pool)."""


class ManualClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1e3
