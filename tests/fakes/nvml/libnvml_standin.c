/* A stand-in for NVIDIA's libnvidia-ml.so.1: the few NVML entry points orchgate calls,
 * with the real ABI, answering from a text file so a test can set and change what the
 * "GPUs" report. Built by tests/test_gpu.py; loaded by pynvml through LD_LIBRARY_PATH.
 *
 * $ORCHGATE_FAKE_NVML names the file: one line per device,
 *   <utilization %> <vram used bytes> <vram total bytes> <name>
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_FOUND 6
#define MAX_DEVICES 8

typedef struct { unsigned int gpu; unsigned int memory; } nvmlUtilization_t;
typedef struct { unsigned long long total; unsigned long long free; unsigned long long used; } nvmlMemory_t;
typedef struct { unsigned int util; unsigned long long used, total; char name[64]; } device_t;

static int load(device_t *devices) {
    const char *path = getenv("ORCHGATE_FAKE_NVML");
    FILE *file = path ? fopen(path, "r") : NULL;
    int count = 0;
    if (!file) return 0;
    while (count < MAX_DEVICES &&
           fscanf(file, "%u %llu %llu %63s", &devices[count].util, &devices[count].used,
                  &devices[count].total, devices[count].name) == 4)
        count++;
    fclose(file);
    return count;
}

static int device(void *handle, device_t *out) {
    device_t devices[MAX_DEVICES];
    int count = load(devices);
    intptr_t index = (intptr_t)handle - 1;
    if (index < 0 || index >= count) return NVML_ERROR_INVALID_ARGUMENT;
    *out = devices[index];
    return NVML_SUCCESS;
}

int nvmlInitWithFlags(unsigned int flags) { (void)flags; return NVML_SUCCESS; }
int nvmlInit_v2(void) { return NVML_SUCCESS; }
int nvmlShutdown(void) { return NVML_SUCCESS; }

const char *nvmlErrorString(int result) {
    return result == NVML_ERROR_INVALID_ARGUMENT ? "Invalid Argument" : "Unknown Error";
}

int nvmlDeviceGetCount_v2(unsigned int *count) {
    device_t devices[MAX_DEVICES];
    *count = (unsigned int)load(devices);
    return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **handle) {
    device_t devices[MAX_DEVICES];
    if (index >= (unsigned int)load(devices)) return NVML_ERROR_INVALID_ARGUMENT;
    *handle = (void *)(intptr_t)(index + 1);
    return NVML_SUCCESS;
}

int nvmlDeviceGetUtilizationRates(void *handle, nvmlUtilization_t *utilization) {
    device_t d;
    int rc = device(handle, &d);
    if (rc != NVML_SUCCESS) return rc;
    utilization->gpu = d.util;
    utilization->memory = d.util;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo(void *handle, nvmlMemory_t *memory) {
    device_t d;
    int rc = device(handle, &d);
    if (rc != NVML_SUCCESS) return rc;
    memory->total = d.total;
    memory->used = d.used;
    memory->free = d.total - d.used;
    return NVML_SUCCESS;
}

int nvmlDeviceGetName(void *handle, char *name, unsigned int length) {
    device_t d;
    int rc = device(handle, &d);
    if (rc != NVML_SUCCESS) return rc;
    snprintf(name, length, "%s", d.name);
    return NVML_SUCCESS;
}
