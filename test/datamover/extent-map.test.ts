import { test } from 'node:test';
import assert from 'node:assert/strict';
import { alignRegions, dataRegions, dirtyRegions, regionBytes } from '../../src/datamover/extent-map.ts';

const MiB = 1024 * 1024;

test('data regions skip what reads as zeros, keep holes without that promise, merge neighbours', () => {
  const extents = [
    { offset: 0, length: 100, flags: 3 }, // hole, reads as zero
    { offset: 100, length: 50, flags: 0 }, // data
    { offset: 150, length: 50, flags: 0 }, // data again: merges
    { offset: 200, length: 10, flags: 2 }, // allocated zeros: nothing to back up
    { offset: 210, length: 10, flags: 1 }, // unallocated without a promise of zeros: must be read
    { offset: 220, length: 30, flags: 0 },
  ];
  assert.deepEqual(dataRegions(extents), [
    { offset: 100, length: 100 },
    { offset: 210, length: 40 },
  ]);
});

test('dirty regions keep flag 1 only', () => {
  const extents = [
    { offset: 0, length: 64, flags: 0 },
    { offset: 64, length: 64, flags: 1 },
    { offset: 128, length: 64, flags: 1 },
    { offset: 192, length: 64, flags: 0 },
  ];
  assert.deepEqual(dirtyRegions(extents), [{ offset: 64, length: 128 }]);
});

test('aligning rounds out to chunks, merges what touches, clips to the disk', () => {
  const sizeBytes = 10 * MiB + 1000;
  const aligned = alignRegions(
    [
      { offset: 100, length: 10 }, // chunk 0
      { offset: MiB - 1, length: 2 }, // chunks 0-1: merges with the first
      { offset: 3 * MiB, length: MiB }, // exactly chunk 3
      { offset: 4 * MiB, length: 1 }, // chunk 4 touches chunk 3: merges
      { offset: 7 * MiB + 5, length: 1 }, // chunk 7 alone
      { offset: 10 * MiB + 10, length: 20 }, // the short last chunk
    ],
    MiB,
    sizeBytes,
  );
  assert.deepEqual(aligned, [
    { offset: 0, length: 2 * MiB },
    { offset: 3 * MiB, length: 2 * MiB },
    { offset: 7 * MiB, length: MiB },
    { offset: 10 * MiB, length: 1000 },
  ]);
  assert.equal(regionBytes(aligned), 5 * MiB + 1000);
});

test('aligning refuses a bad chunk size and unsorted input', () => {
  assert.throws(() => alignRegions([], 0, 100), /chunk size/);
  assert.throws(() => alignRegions([{ offset: 5 * MiB, length: 1 }, { offset: 0, length: 1 }], MiB, 10 * MiB), /sorted/);
});
