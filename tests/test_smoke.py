import trio


async def test_clock_is_virtual(autojump_clock):
    start = trio.current_time()
    await trio.sleep(1000)
    assert trio.current_time() - start == 1000
