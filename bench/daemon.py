#!/usr/bin/env python3
"""Measures the daemon as systemd runs it (release build, real NOTIFY_SOCKET, local S3):

- idle RSS after startup and after 10 deployments (from /proc/<pid>/status VmRSS);
- CPU time used over an idle period (utime + stime from /proc/<pid>/stat), with watchdog on;
- latency from SIGHUP, and from a trigger file renamed into place, to the deployment starting
  (the first STATUS= of the new deployment on the notify socket).

    bench/daemon.py [IDLE_SECONDS]          (needs: cargo build --release; moto_server; boto3)
"""
import hashlib, io, os, shutil, signal, socket, statistics, subprocess, sys, tarfile, tempfile, time

IDLE = int(sys.argv[1]) if len(sys.argv) > 1 else 60
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOYD = os.environ.get("DEPLOYD", os.path.join(ROOT, "target/release/deployd"))
import boto3

work = tempfile.mkdtemp(prefix="deployd-daemon-bench.")
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
env = dict(os.environ, AWS_ACCESS_KEY_ID="b", AWS_SECRET_ACCESS_KEY="b", AWS_REGION="us-east-1",
           AWS_EC2_METADATA_DISABLED="true")
os.environ.update(env)
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port), 0.1).close(); break
    except OSError:
        time.sleep(0.1)
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
s3.create_bucket(Bucket="bench")

def artifact(version):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(50):
            data = f"{version} file {i}\n".encode() * 200
            info = tarfile.TarInfo(f"./src/f{i}.js"); info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body = buf.getvalue()
    key = f"app/bench/{version}/app-deployment.tar.gz"
    s3.put_object(Bucket="bench", Key=key, Body=body,
                  Metadata={"sha256": hashlib.sha256(body).hexdigest(), "commit-sha": version * 4})
    return key

keys = [artifact(f"v{i:03d}") for i in range(12)]
with open(f"{work}/environment", "w") as f:
    f.write(f"DEPLOYMENT_BUCKET=bench\nDEPLOYMENT_KEY={keys[0]}\n")
with open(f"{work}/deployd.toml", "w") as f:
    f.write(f'state_dir = "{work}/state"\nruntime_dir = "{work}/run"\n'
            f'environment_file = "{work}/environment"\n[s3]\nendpoint_url = "http://127.0.0.1:{port}"\n'
            f'[containers]\nenabled = false\n')
sock_path = f"{work}/notify.sock"
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); sock.bind(sock_path); sock.settimeout(30)
daemon = subprocess.Popen([DEPLOYD, "--config", f"{work}/deployd.toml", "run"],
                          env=dict(env, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="20000000"),
                          stderr=open(f"{work}/daemon.log", "w"))

def until(pred):
    while True:
        msg = sock.recv(4096).decode()
        if pred(msg):
            return msg

def rss_kib():
    for line in open(f"/proc/{daemon.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def cpu_seconds():
    fields = open(f"/proc/{daemon.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

try:
    until(lambda m: "READY=1" in m)
    time.sleep(2)
    rss_start = rss_kib()

    hup = []
    for _ in range(10):
        t0 = time.monotonic(); daemon.send_signal(signal.SIGHUP)
        until(lambda m: m.startswith("STATUS=resolving"))
        hup.append(time.monotonic() - t0)
        until(lambda m: "READY=1" in m)

    drop = []
    trig = f"{work}/run/triggers"
    for i, key in enumerate(keys[1:11]):
        tmp = f"{trig}/.t{i}.tmp"
        with open(tmp, "w") as f:
            f.write(f'bucket = "bench"\nkey = "{key}"\n')
        t0 = time.monotonic(); os.rename(tmp, f"{trig}/t{i}.toml")
        until(lambda m: m.startswith("STATUS=resolving"))
        drop.append(time.monotonic() - t0)
        until(lambda m: m.startswith("STATUS=serving"))
    time.sleep(2)
    rss_after = rss_kib()

    cpu0 = cpu_seconds(); time.sleep(IDLE); cpu1 = cpu_seconds()
    rss_idle = rss_kib()
    ms = lambda xs: f"median {statistics.median(xs)*1000:.1f} ms, max {max(xs)*1000:.1f} ms"
    print(f"idle RSS after startup:          {rss_start/1024:.1f} MiB  (goal <= 12 MiB)")
    print(f"idle RSS after 10 deployments:   {rss_after/1024:.1f} MiB")
    print(f"idle RSS after {IDLE} s more idle:   {rss_idle/1024:.1f} MiB")
    print(f"CPU over {IDLE} s idle (watchdog 10 s): {cpu1-cpu0:.3f} s")
    print(f"SIGHUP -> deployment start:      {ms(hup)}  (goal <= 50 ms)")
    print(f"file drop -> deployment start:   {ms(drop)}  (goal <= 250 ms)")
finally:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(10)
    except subprocess.TimeoutExpired:
        daemon.kill()
    moto.kill()
    shutil.rmtree(work, ignore_errors=True)
