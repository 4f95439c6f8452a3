// Assertions shared by the test files.

import assert from 'node:assert/strict';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';

/** For assert.rejects / assert.throws: the error is a HallmarkError with this code. */
export const hasCode = (code: ErrorCode) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
  assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
  return true;
};
