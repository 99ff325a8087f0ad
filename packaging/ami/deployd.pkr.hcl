# Packer template: a Debian 12 image with Docker and deployd installed and
# deployd.service enabled but never started, so every instance launched from
# it deploys what its own user data names (cloud-init/ec2-user-data.yaml).
#
#   cargo build --release --locked && cargo deb --no-build
#   packer init packaging/ami
#   packer build -var deb=target/debian/deployd_0.1.0-1_amd64.deb \
#     -var public_key="$(tail -1 deployd.pub)" packaging/ami

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = "~> 1.3"
    }
  }
}

variable "deb" {
  type        = string
  description = "Path of the deployd .deb to install (cargo deb output)."
}

variable "public_key" {
  type        = string
  description = "The minisign public key CI signs releases with (the RWQ... line of minisign.pub); instances refuse anything else."
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "ami_name_prefix" {
  type    = string
  default = "deployd-debian12"
}

locals {
  timestamp = formatdate("YYYYMMDD-hhmmss", timestamp())
}

source "amazon-ebs" "debian12" {
  region        = var.region
  instance_type = var.instance_type
  ami_name      = "${var.ami_name_prefix}-${local.timestamp}"
  ssh_username  = "admin"

  # Official Debian 12 images, published by Debian's AWS account.
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["136693071363"]
    most_recent = true
  }

  # IMDSv2 only, on the build instance and on instances launched from the image.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 2
  }
  imds_support = "v2.0"

  tags = {
    Name    = "${var.ami_name_prefix}-${local.timestamp}"
    deployd = "installed"
  }
}

build {
  sources = ["source.amazon-ebs.debian12"]

  provisioner "file" {
    source      = var.deb
    destination = "/tmp/deployd.deb"
  }

  provisioner "shell" {
    execute_command = "sudo -E sh -eux '{{ .Path }}'"
    environment_vars = [
      "DEBIAN_FRONTEND=noninteractive",
    ]
    inline = [
      "apt-get update",
      "apt-get install -y --no-install-recommends docker.io ca-certificates",
      "systemctl enable docker.service",
      # The package enables deployd.service and does not start it.
      "apt-get install -y /tmp/deployd.deb",
      "rm -f /tmp/deployd.deb",
      "test \"$(systemctl is-enabled deployd.service)\" = enabled",
      "if systemctl is-active --quiet deployd.service; then echo 'deployd.service is running on the build instance' >&2; exit 1; fi",
      "test -x /usr/bin/deployd",
      # Signed releases only: appended to the packaged config, whose keys are
      # all commented out.
      "printf '\\n[source]\\npublic_key = \"%s\"\\n' '${var.public_key}' >> /etc/deployd/deployd.toml",
      # A key that is not one stops the build here, not every instance later.
      "DEPLOYMENT_BUCKET=image-check DEPLOYMENT_KEY=image-check deployd check-config",
    ]
  }

  # Leave nothing instance-specific behind: no releases, no state, no
  # trigger files, no environment file, and let cloud-init run again on the
  # first boot of every instance.
  provisioner "shell" {
    execute_command = "sudo -E sh -eux '{{ .Path }}'"
    inline = [
      "systemctl stop deployd.service || true",
      "rm -rf /var/lib/deployd/releases/* /var/lib/deployd/staging/* /var/lib/deployd/current /var/lib/deployd/state.json",
      "rm -rf /run/deployd/triggers/* /run/deployd/status.json",
      "rm -f /etc/deployd/environment /etc/deployd/aws-credentials",
      "apt-get clean",
      "cloud-init clean --logs --seed",
    ]
  }
}
