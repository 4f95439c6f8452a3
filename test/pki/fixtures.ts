// Shared test fixtures for PKI tests: OpenSSL as an independent implementation, and in-memory keys
// and signers. Not a test file itself (no tests are registered here).

import { spawnSync } from 'node:child_process';
import { createPublicKey, generateKeyPairSync, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Signer } from '../../src/keys/key-backend.js';
import { signingSchemeFor, type KeyAlgorithm } from '../../src/pki/algorithms.js';
import { encodePem } from '../../src/pki/pem.js';

/** Runs openssl; returns stdout (and stderr). Throws with stderr when it exits non-zero. */
export function openssl(args: readonly string[], input?: Buffer | string): { stdout: Buffer; stderr: string } {
  const r = spawnSync('openssl', args, { input, maxBuffer: 16 * 1024 * 1024 });
  if (r.error) throw r.error;
  const stderr = r.stderr.toString('utf8');
  if (r.status !== 0) throw new Error(`openssl ${args.join(' ')} exited ${r.status}: ${stderr}${r.stdout.toString('utf8')}`);
  return { stdout: r.stdout, stderr };
}

export const NEWKEY_ARGS: Readonly<Record<string, readonly string[]>> = {
  'ecdsa-p256': ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256'],
  'ecdsa-p384': ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-384', '-sha384'],
  'ecdsa-p521': ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-521', '-sha512'],
  'secp256k1': ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:secp256k1'],
  ed25519: ['-newkey', 'ed25519'],
  'rsa-1024': ['-newkey', 'rsa:1024'],
  'rsa-2048': ['-newkey', 'rsa:2048'],
};

/** A DER CSR made by `openssl req` with a throw-away key. */
export function opensslCsr(keyKind: keyof typeof NEWKEY_ARGS | string, subject: string, extra: readonly string[] = []): Buffer {
  const keyArgs = NEWKEY_ARGS[keyKind];
  if (!keyArgs) throw new Error(`no openssl key arguments for ${keyKind}`);
  return openssl(['req', '-new', ...keyArgs, '-nodes', '-keyout', '/dev/null', '-subj', subject, '-outform', 'DER', ...extra]).stdout;
}

/** `openssl req -verify` on a DER CSR: true when OpenSSL accepts its self-signature. */
export function opensslVerifiesCsr(der: Buffer): boolean {
  const { stderr } = openssl(['req', '-inform', 'DER', '-verify', '-noout'], der);
  return /verify OK/.test(stderr);
}

/** `openssl x509 -text` of a DER certificate. */
export function opensslText(der: Buffer): string {
  return openssl(['x509', '-inform', 'DER', '-noout', '-text'], der).stdout.toString('utf8');
}

/** Writes DER certificates as PEM files into `dir`; returns their paths. */
export function writePems(dir: string, certs: Record<string, Buffer | readonly Buffer[]>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, ders] of Object.entries(certs)) {
    const path = join(dir, `${name}.pem`);
    writeFileSync(path, (Array.isArray(ders) ? ders : [ders as Buffer]).map((d) => encodePem('CERTIFICATE', d)).join(''));
    out[name] = path;
  }
  return out;
}

/** `openssl verify`; returns its output. Throws (with OpenSSL's reason) when the chain does not verify. */
export function opensslVerify(rootPem: string, untrustedPem: string | undefined, leafPem: string, extra: readonly string[] = []): string {
  const args = ['verify', '-CAfile', rootPem, ...(untrustedPem ? ['-untrusted', untrustedPem] : []), ...extra, leafPem];
  return openssl(args).stdout.toString('utf8');
}

export function generateKey(alg: KeyAlgorithm): { privateKey: KeyObject; publicKey: KeyObject } {
  switch (alg) {
    case 'ecdsa-p256': return generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    case 'ecdsa-p384': return generateKeyPairSync('ec', { namedCurve: 'secp384r1' });
    case 'ed25519': return generateKeyPairSync('ed25519');
    case 'rsa-2048': return generateKeyPairSync('rsa', { modulusLength: 2048 });
    case 'rsa-3072': return generateKeyPairSync('rsa', { modulusLength: 3072 });
  }
}

export const spkiOf = (key: KeyObject): Buffer => (key.type === 'public' ? key : createPublicKey(key)).export({ type: 'spki', format: 'der' });

/** A Signer over an in-memory key (what a key backend hands out). */
export function memorySigner(alg: KeyAlgorithm, privateKey = generateKey(alg).privateKey): Signer {
  const hash = signingSchemeFor(alg).hash;
  return {
    ref: { backend: 'file', id: `memory-${alg}`, algorithm: alg },
    publicKeySpki: spkiOf(privateKey),
    sign: async (data: Buffer) => cryptoSign(hash, data, privateKey),
  };
}

/** @peculiar/x509 (an independent parser for cross-checks) needs the Reflect metadata polyfill loaded first. */
export async function loadPeculiarX509(): Promise<typeof import('@peculiar/x509')> {
  await import('reflect-metadata');
  return import('@peculiar/x509');
}
