# deployd %preun: on erase ($1 = 0) stop and disable the service. An upgrade
# ($1 = 1) leaves it running; %postun restarts it with the new binary.
# Containers that deployd started keep running: they belong to the Docker
# engine, not to this service.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop deployd.service >/dev/null 2>&1 || :
    fi
    systemctl --no-reload disable deployd.service >/dev/null 2>&1 || :
fi
