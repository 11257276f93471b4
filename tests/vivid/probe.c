/*
 * Smoke check for the vivid VM harness (tests/vivid/run-vm.sh): proves that the
 * guest kernel loaded vivid and that the harness carries the exit code back.
 *
 *   probe [--device PATH] [--expect-driver NAME]
 *
 * Exit status: 0 when the driver reported by VIDIOC_QUERYCAP is NAME (default
 * "vivid"), 1 when it is another driver, 2 when the device cannot be opened or
 * queried. Distinct codes let the harness's own check see that the exact value
 * travels through the guest, not merely "zero or not".
 *
 * Build it static (the guest has no libc): gcc -static -O2 -o probe probe.c
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/videodev2.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static void fourcc(__u32 f, char out[5])
{
	for (int i = 0; i < 4; i++)
		out[i] = (char)((f >> (8 * i)) & 0xff);
	out[4] = '\0';
}

int main(int argc, char **argv)
{
	const char *device = "/dev/video0";
	const char *expect = "vivid";

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--device") == 0 && i + 1 < argc) {
			device = argv[++i];
		} else if (strcmp(argv[i], "--expect-driver") == 0 && i + 1 < argc) {
			expect = argv[++i];
		} else {
			fprintf(stderr, "probe: unknown argument %s\n", argv[i]);
			return 2;
		}
	}

	int fd = open(device, O_RDWR);
	if (fd < 0) {
		fprintf(stderr, "probe: open %s: %s\n", device, strerror(errno));
		return 2;
	}

	struct v4l2_capability cap;
	memset(&cap, 0, sizeof cap);
	if (ioctl(fd, VIDIOC_QUERYCAP, &cap) < 0) {
		fprintf(stderr, "probe: VIDIOC_QUERYCAP on %s: %s\n", device, strerror(errno));
		close(fd);
		return 2;
	}
	printf("probe: %s: driver=%s card=%s bus=%s caps=0x%08x device_caps=0x%08x\n",
	       device, (const char *)cap.driver, (const char *)cap.card,
	       (const char *)cap.bus_info, cap.capabilities, cap.device_caps);

	/* Not needed for the verdict, but shows the node is a working capture node. */
	struct v4l2_format fmt;
	memset(&fmt, 0, sizeof fmt);
	fmt.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
	if (ioctl(fd, VIDIOC_G_FMT, &fmt) == 0) {
		char fcc[5];
		fourcc(fmt.fmt.pix.pixelformat, fcc);
		printf("probe: current format %ux%u %s\n", fmt.fmt.pix.width,
		       fmt.fmt.pix.height, fcc);
	} else {
		printf("probe: VIDIOC_G_FMT: %s\n", strerror(errno));
	}
	close(fd);

	if (strcmp((const char *)cap.driver, expect) != 0) {
		printf("probe: FAIL: driver is %s, expected %s\n", (const char *)cap.driver, expect);
		return 1;
	}
	printf("probe: OK: driver is %s\n", expect);
	return 0;
}
