"""A real WebDAV store for the remote build cache: nginx with its dav module, on 127.0.0.1.

Used by the tests and bench/cache.py, and a template for a team's own server: PUT creates
objects, GET/HEAD read them, nothing else is allowed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from grc.serving.common.process import free_port

CONF = """\
{user}
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      root {root}/store;
      dav_methods PUT;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
      client_max_body_size 0;
      limit_except GET HEAD PUT {{ deny all; }}
    }}
  }}
}}
"""


class NginxStore:
    """``with NginxStore(folder) as url:`` runs nginx until the block ends."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def store(self) -> Path:
        return self.root / "store"

    def __enter__(self) -> str:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise FileNotFoundError("nginx is not installed (apt-get install nginx)")
        self.store.mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""  # workers must write the store we own
        conf = self.root / "nginx.conf"
        conf.write_text(CONF.format(root=self.root, port=self.port, user=user))
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(self.root)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/", timeout=1)
            except urllib.error.HTTPError:
                return url  # it answers (403/404 on the bare root is fine)
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"nginx exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                        f" {(self.root / 'error.log').read_text() if (self.root / 'error.log').exists() else ''}"
                    ) from None
                time.sleep(0.05)
            else:
                return url
        raise TimeoutError("nginx did not answer within 15 s")

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
