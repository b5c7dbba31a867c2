"""A short tour of codewords-lite, runnable in one command, once the package is installed.

    pip install . && python examples/quickstart.py        # against a local emulator, no key needed
    CODEWORDS_API_KEY=cwk-... python examples/quickstart.py SERVICE_ID '{"name": "Ada"}'

It uses the installed package, not the checkout's codewords_lite.py, so it also checks the install.
With CODEWORDS_API_KEY set it calls the real service; without it, it starts the emulator from
tests/fake_runtime.py on a free loopback port and shows a blocking run, a start and wait, and a
gateway 504 resumed without running the workflow a second time.
"""

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import codewords_lite as cw
except ImportError as exc:
    if exc.name != "codewords_lite":
        raise
    raise SystemExit(
        f"codewords-lite is not installed for {sys.executable}: run `pip install .` in {os.path.dirname(HERE)}"
    ) from None


def real_service(service_id: str, inputs: dict) -> None:
    with cw.Client() as client:
        print(f"Calling {service_id} on {client.base_url} with your CODEWORDS_API_KEY")
        print("run():", client.run(service_id, inputs))
        run = client.start(service_id, inputs)
        print("start():", run.request_id)
        print("wait():", run.wait(timeout=600))


def emulator_tour() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from fake_runtime import FakeRuntime

    print(f"codewords-lite {cw.__version__}, installed at {cw.__file__}")
    print("No CODEWORDS_API_KEY: using the local emulator (its gateway cuts blocking calls at 1 s)\n")
    with FakeRuntime(gateway_timeout=1.0) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        print("1. A blocking run")
        print("   client.run('echo', {'name': 'Ada'}) ->", client.run("echo", {"name": "Ada"}))

        print("2. Start in the background, then wait")
        run = client.start("sleep", {"seconds": 0.5})
        print(f"   client.start('sleep', ...) -> {run!r}")
        print("   run.wait() ->", run.wait(timeout=30))

        print("3. A blocking run of 2.5 s behind the 1 s gateway")
        started, executions = time.monotonic(), runtime.executions["sleep"]
        output = client.run("sleep", {"seconds": 2.5})
        posts = len(runtime.calls_to("POST", "/run/sleep"))
        print(f"   -> {output} after {time.monotonic() - started:.1f} s: the gateway answered 504, and run()")
        print(
            f"   waited for the same run by its provisioned id ({posts} POST /run, the workflow executed"
            f" {runtime.executions['sleep'] - executions} time)"
        )

        print("4. A failing workflow")
        try:
            client.run("fail", {"detail": "the input was wrong"})
        except cw.RunFailed as error:  # the workflow's own failure
            print(f"   {type(error).__name__}: {error}")

        print("5. The same from the command line")
        command = [sys.executable, "-m", "codewords_lite", "run", "echo", '{"name": "Ada"}', "-i", "n=3"]
        env = dict(os.environ, CODEWORDS_API_KEY=runtime.api_key, CODEWORDS_BASE_URL=runtime.url)
        result = subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True)  # not the checkout
        print('   $ codewords-lite run echo \'{"name": "Ada"}\' -i n=3')
        print(f"   {result.stdout.strip()}    (exit code {result.returncode})")


def main() -> None:
    if os.environ.get(cw.API_KEY_ENV):
        if len(sys.argv) < 2:
            raise SystemExit('usage: quickstart.py SERVICE_ID [\'{"input": "value"}\']')
        real_service(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    else:
        emulator_tour()


if __name__ == "__main__":
    main()
