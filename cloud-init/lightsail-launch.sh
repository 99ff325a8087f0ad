#!/bin/bash
# Lightsail launch script for deployd (paste it as the instance's launch
# script; cloud-init runs it once, as root, at first boot).
#
# Lightsail instances have no instance profile, so deployd authenticates as a
# dedicated IAM user whose only permissions are the S3 statements in
# packaging/README.md. Its keys go into a root-only file that the standard
# AWS credential chain reads through AWS_SHARED_CREDENTIALS_FILE, set by a
# systemd drop-in. The file is not under /root: the unit hides home
# directories (ProtectHome=yes). EC2 tagging is switched off because a
# Lightsail instance is not an EC2 instance of this account; for the same
# reason the legacy key templates cannot use {account_id}, so name the
# artifact explicitly.
#
# Works on the Debian 12 and Amazon Linux 2023 blueprints. If deployd is not
# installed yet, the package is fetched from S3 with the same credentials.
set -euo pipefail

# ---- fill these in --------------------------------------------------------
AWS_REGION=us-east-1
AWS_ACCESS_KEY_ID=AKIAEXAMPLEEXAMPLE00
AWS_SECRET_ACCESS_KEY=replace-with-the-deployd-users-secret-access-key
DEPLOYMENT_BUCKET=macro-ai-deployment-artifacts-123456789012
DEPLOYMENT_KEY=express-api/pr-51/1a2b3c4d-20261123-031500/express-api-deployment.tar.gz
# The minisign public key CI signs releases with (second line of minisign.pub).
PUBLIC_KEY=RWQ-REPLACE-WITH-THE-SECOND-LINE-OF-YOUR-minisign.pub
# Where the deployd packages are, for images without deployd.
PACKAGE_BUCKET=$DEPLOYMENT_BUCKET
PACKAGE_PREFIX=deployd/packages/0.1.0
# ---------------------------------------------------------------------------

umask 077
install -d -m 0755 /etc/deployd

cat > /etc/deployd/aws-credentials <<CREDENTIALS
[default]
aws_access_key_id = ${AWS_ACCESS_KEY_ID}
aws_secret_access_key = ${AWS_SECRET_ACCESS_KEY}
CREDENTIALS
chmod 0600 /etc/deployd/aws-credentials

cat > /etc/deployd/environment <<ENVIRONMENT
DEPLOYMENT_BUCKET=${DEPLOYMENT_BUCKET}
DEPLOYMENT_KEY=${DEPLOYMENT_KEY}
# Pointer variant: a JSON object CI rewrites to name the newest key.
# DEPLOYMENT_POINTER=express-api/pr-51/current.json
ENVIRONMENT
chmod 0600 /etc/deployd/environment

install -d -m 0755 /etc/systemd/system/deployd.service.d
cat > /etc/systemd/system/deployd.service.d/lightsail.conf <<DROPIN
[Service]
Environment=AWS_SHARED_CREDENTIALS_FILE=/etc/deployd/aws-credentials
Environment=AWS_REGION=${AWS_REGION}
DROPIN
chmod 0644 /etc/systemd/system/deployd.service.d/lightsail.conf

# Install Docker, and deployd from S3 when the image does not have it.
if ! command -v deployd >/dev/null 2>&1; then
    work=$(mktemp -d)
    export AWS_SHARED_CREDENTIALS_FILE=/etc/deployd/aws-credentials AWS_REGION
    if command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends awscli docker.io ca-certificates
        aws s3 cp "s3://${PACKAGE_BUCKET}/${PACKAGE_PREFIX}/deployd_0.1.0-1_amd64.deb" "$work/deployd.deb"
        apt-get install -y "$work/deployd.deb"
    else
        dnf install -y docker
        command -v aws >/dev/null 2>&1 || dnf install -y awscli-2
        aws s3 cp "s3://${PACKAGE_BUCKET}/${PACKAGE_PREFIX}/deployd-0.1.0-1.x86_64.rpm" "$work/deployd.rpm"
        dnf install -y "$work/deployd.rpm"
    fi
    rm -rf "$work"
fi

# No EC2 tags on Lightsail; signed releases only. The packaged deployd.toml
# has every key commented out, so appending [source] and [report] tables is
# safe; refuse to guess if someone already uncommented one.
config=/etc/deployd/deployd.toml
for table in source report; do
    if grep -q "^[[:space:]]*\[$table\]" "$config" 2>/dev/null; then
        echo "lightsail-launch: $config already has a [$table] table; edit it by hand" >&2
        exit 78
    fi
done
umask 022
cat >> "$config" <<CONFIG

# Only releases CI signed with this key are deployed.
[source]
public_key = "${PUBLIC_KEY}"

# Lightsail: not an EC2 instance of this account, so no instance tags.
[report]
ec2_tags = false
CONFIG

systemctl daemon-reload
systemctl enable --now docker.service
systemctl enable --now --no-block deployd.service
deployd status --wait --timeout 15m
