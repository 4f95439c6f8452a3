// The JS P-256 point check used by bulk imports must agree with OpenSSL on every key.

import assert from 'node:assert/strict';
import { createPublicKey, generateKeyPairSync, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { isP256Point, isP256Spki } from '../../../src/pki/p256.js';

const P = Buffer.from('ffffffff00000001000000000000000000000000ffffffffffffffffffffffff', 'hex');

function opensslAccepts(x: Buffer, y: Buffer): boolean {
  try {
    createPublicKey({ key: { kty: 'EC', crv: 'P-256', x: x.toString('base64url'), y: y.toString('base64url') }, format: 'jwk' });
    return true;
  } catch {
    return false;
  }
}

test('agrees with OpenSSL on real keys, their negations, perturbed points and random coordinates', () => {
  for (let i = 0; i < 300; i++) {
    const spki = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' });
    assert.ok(isP256Spki(spki));
    const x = spki.subarray(27, 59);
    const y = spki.subarray(59, 91);
    assert.equal(isP256Point(x, y), true);
    // (x, p − y) is the negated point: also on the curve.
    const negY = Buffer.from((BigInt(`0x${P.toString('hex')}`) - BigInt(`0x${y.toString('hex')}`)).toString(16).padStart(64, '0'), 'hex');
    assert.equal(isP256Point(x, negY), true);
    assert.equal(opensslAccepts(x, negY), true);
    const bent = Buffer.from(y);
    bent[i % 32]! ^= 1 << (i % 8);
    assert.equal(isP256Point(x, bent), opensslAccepts(x, bent), `perturbed point ${i}`);
    assert.equal(isP256Point(x, bent), false);
    const rx = randomBytes(32);
    const ry = randomBytes(32);
    assert.equal(isP256Point(rx, ry), opensslAccepts(rx, ry));
  }
});

test('refuses coordinates out of range, the zero point and wrong lengths', () => {
  const zero = Buffer.alloc(32);
  assert.equal(isP256Point(zero, zero), false);
  assert.equal(isP256Point(P, zero), false);
  assert.equal(isP256Point(zero, P), false);
  assert.equal(isP256Point(Buffer.alloc(32, 0xff), Buffer.alloc(32, 0xff)), false);
  assert.equal(isP256Point(Buffer.alloc(31), Buffer.alloc(32)), false);
  const spki = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' });
  assert.equal(isP256Spki(spki.subarray(0, 90)), false);
  const p384 = generateKeyPairSync('ec', { namedCurve: 'P-384' }).publicKey.export({ type: 'spki', format: 'der' });
  assert.equal(isP256Spki(p384), false);
});
