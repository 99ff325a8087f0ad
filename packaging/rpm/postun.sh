# deployd %postun: reload systemd after the unit file changed or went away,
# and restart a running service after an upgrade ($1 >= 1). RPM has no
# purge: /var/lib/deployd (releases, state.json) stays after an erase;
# remove it by hand when the host no longer needs its releases.
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart deployd.service >/dev/null 2>&1 || :
    fi
fi
