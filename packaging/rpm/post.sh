# deployd %post: create the runtime/state directories, reload systemd and
# enable deployd.service on a fresh install ($1 = 1). It does NOT start the
# service: installing the package while baking an image must not deploy.
systemd-tmpfiles --create deployd.conf >/dev/null 2>&1 || :
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    systemctl enable deployd.service
fi
