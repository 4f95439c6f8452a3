// A device key held in SoftHSM2 that the real `openssl` and `curl` binaries can use, for interop tests
// that must make a CSR (or authenticate over TLS) with a key that never leaves a token.
//
// The bridge is the OpenSSL *engine* from libp11 (Debian: libengine-pkcs11-openssl, which installs
// ENGINESDIR/pkcs11.so). The OpenSSL 3 provider (pkcs11-provider) is not in Debian 12 bookworm.
// The engine loads the PKCS#11 module named by PKCS11_MODULE_PATH (set in `env`), and takes RFC 7512
// URIs with the PIN in them (`pin-value=`), so no prompt ever appears. The PIN is therefore visible
// in the child's argv: fine for throw-away test tokens, never for real ones.
//
// Working invocations (all with `env`):
//   openssl req -new  -engine pkcs11 -keyform engine -key 'pkcs11:…;type=private;pin-value=…' -config req.cnf -out csr.der -outform DER
//   openssl req -x509 -engine pkcs11 -keyform engine -key 'pkcs11:…' -subj /CN=… -days 1 -out cert.pem
//   openssl s_client -engine pkcs11 -keyform engine -key 'pkcs11:…' -cert cert.pem -CAfile server.pem -connect …
//   curl --engine pkcs11 --key-type ENG --key 'pkcs11:…' --cert cert.pem --cacert server.pem https://…
// Note `openssl req -subj` silently drops the config's [attributes] (challengePassword) in OpenSSL 3.0,
// so makeCsrWithTokenKey puts the subject into the config file instead.
//
// Availability: outside CI a missing piece (softhsm2, opensc's pkcs11-tool, openssl, the engine) makes
// tests skip with the reason (opensslPkcs11Skip, softHsmOpensslKeyOrSkip); under CI=true they fail.

import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { createPublicKey, randomBytes } from 'node:crypto';
import { accessSync, constants } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import type { TestContext } from 'node:test';
import { promisify } from 'node:util';
import { createSoftHsmToken, softHsmAvailable, type SoftHsmToken } from './softhsm.js';
import { makeTempDir } from './tmp.js';

const run = promisify(execFile);

const INSTALL_HINT = 'apt-get install softhsm2 opensc libengine-pkcs11-openssl (or: bash .ci/run)';

export interface SoftHsmOpensslKeyOptions {
  /** Put the key on this token instead of a new one (the token is then NOT deleted by cleanup()). */
  readonly token?: SoftHsmToken;
  /** Label for the new token (ignored with `token`); default a random hallmark-test-… label. */
  readonly tokenLabel?: string;
  /** CKA_LABEL of the key pair; default "device-key". */
  readonly keyLabel?: string;
  /** CKA_ID of the key pair as hex; default random 4 bytes. */
  readonly keyId?: string;
}

export interface SoftHsmOpensslKey {
  /** RFC 7512 URI of the private key, PIN included: `pkcs11:token=…;object=…;id=…;type=private;pin-value=…`. */
  readonly keyUri: string;
  /** The same key pair's public half (no PIN needed). */
  readonly publicKeyUri: string;
  /** The token's public key as DER SubjectPublicKeyInfo (read with pkcs11-tool, not through the engine). */
  readonly publicKeySpkiDer: Buffer;
  /** The same, PEM. */
  readonly publicKeyPem: string;
  /** process.env plus SOFTHSM2_CONF and PKCS11_MODULE_PATH: pass to every openssl/curl child. */
  readonly env: NodeJS.ProcessEnv;
  /** Arguments that make an openssl command take `-key keyUri` from the token: ['-engine','pkcs11','-keyform','engine']. */
  readonly opensslArgs: readonly string[];
  /** opensslArgs followed by ['-key', keyUri]. */
  readonly opensslKeyArgs: readonly string[];
  /** The token holding the key (module, label, PINs). */
  readonly token: SoftHsmToken;
  /** A scratch directory living as long as the key. */
  readonly dir: string;
  /** curl arguments presenting certPath with the token key as TLS client credentials. */
  curlArgs(certPath: string): string[];
  /** Removes the scratch directory and the token (unless it was passed in). Idempotent. */
  cleanup(): Promise<void>;
}

function commandWorks(command: string, args: string[]): { ok: boolean; output: string } {
  try {
    const output = execFileSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 15_000 });
    return { ok: true, output };
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string };
    return { ok: false, output: `${e.stdout ?? ''}${e.stderr ?? ''}` };
  }
}

function onPath(command: string): boolean {
  return (process.env.PATH ?? '').split(delimiter).some((dir) => {
    if (!dir) return false;
    try {
      accessSync(join(dir, command), constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

let opensslReason: string | null | undefined;

/** Why the openssl + SoftHSM2 bridge cannot run here, or undefined when it can. Cached. */
export function opensslPkcs11Unavailable(): string | undefined {
  if (opensslReason !== undefined) return opensslReason ?? undefined;
  let reason: string | undefined;
  if (!softHsmAvailable()) reason = 'softhsm2 not installed';
  else if (!onPath('pkcs11-tool')) reason = 'pkcs11-tool (opensc) not installed';
  else if (!commandWorks('openssl', ['version']).ok) reason = 'openssl not installed';
  else {
    const engine = commandWorks('openssl', ['engine', '-t', 'pkcs11']);
    if (!engine.ok || !engine.output.includes('[ available ]')) reason = 'the OpenSSL pkcs11 engine (libengine-pkcs11-openssl) is not installed';
  }
  opensslReason = reason ? `${reason}: ${INSTALL_HINT}` : null;
  return reason ? opensslReason! : undefined;
}

let curlReason: string | null | undefined;

/** Why curl cannot use the pkcs11 engine here (not installed, or not built on OpenSSL), or undefined. */
export function curlPkcs11Unavailable(): string | undefined {
  if (curlReason !== undefined) return curlReason ?? undefined;
  const base = opensslPkcs11Unavailable();
  let reason: string | undefined = base;
  if (!reason) {
    const v = commandWorks('curl', ['--version']);
    if (!v.ok) reason = 'curl not installed: apt-get install curl';
    else if (!/\bOpenSSL\//.test(v.output)) reason = `curl is not built on OpenSSL (no engine support): ${v.output.split('\n')[0]}`;
  }
  curlReason = reason ?? null;
  return reason;
}

/** For describe/test `{ skip }`: the reason when unavailable and not under CI=true, else false (CI then fails). */
export function opensslPkcs11Skip(): string | false {
  if (process.env.CI === 'true') return false;
  return opensslPkcs11Unavailable() ?? false;
}

/** Same for curl with the engine. */
export function curlPkcs11Skip(): string | false {
  if (process.env.CI === 'true') return false;
  return curlPkcs11Unavailable() ?? false;
}

/** Fails (with the install hint) when the bridge is unavailable: call it first in tests that did not skip. */
export function requireOpensslPkcs11(): void {
  const reason = opensslPkcs11Unavailable();
  assert.ok(!reason, `${reason}${process.env.CI === 'true' ? ' (required under CI=true)' : ''}`);
}

function uriEscape(value: string): string {
  // RFC 7512 pchar minus ';' (attribute separator) and '?' / '#' — percent-encode everything else unusual.
  return Array.from(Buffer.from(value, 'utf8'))
    .map((b) => (/[A-Za-z0-9\-._~]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : `%${b.toString(16).padStart(2, '0').toUpperCase()}`))
    .join('');
}

function hexToUriId(hex: string): string {
  return hex.match(/../g)!.map((b) => `%${b.toUpperCase()}`).join('');
}

/** Runs a tool, reporting its stderr (but never its arguments, which hold PINs) on failure. */
async function tool(command: string, args: readonly string[], env: NodeJS.ProcessEnv, what: string): Promise<string> {
  try {
    const { stdout } = await run(command, args as string[], { env, timeout: 60_000, maxBuffer: 16 * 1024 * 1024 });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; code?: unknown; signal?: unknown };
    const output = (e.stderr || e.stdout || '').trim();
    throw new Error(`${command} ${what} failed (exit ${String(e.code ?? e.signal)}): ${output}`);
  }
}

/**
 * Creates a SoftHSM2 token (or uses options.token), generates an EC P-256 key pair on it with pkcs11-tool
 * (sensitive, never extractable) and returns what openssl and curl need to use it.
 * Throws when softhsm2, pkcs11-tool, openssl or the pkcs11 engine is missing.
 */
export async function softHsmOpensslKey(options: SoftHsmOpensslKeyOptions = {}): Promise<SoftHsmOpensslKey> {
  const missing = opensslPkcs11Unavailable();
  if (missing) throw new Error(missing);
  const keyLabel = options.keyLabel ?? 'device-key';
  const keyId = (options.keyId ?? randomBytes(4).toString('hex')).toLowerCase();
  if (!/^(?:[0-9a-f]{2})+$/.test(keyId)) throw new Error(`keyId must be hex bytes, got ${JSON.stringify(keyId)}`);

  const ownToken = !options.token;
  const token = options.token ?? (await createSoftHsmToken(options.tokenLabel));
  let scratch: Awaited<ReturnType<typeof makeTempDir>> | undefined;
  try {
    scratch = await makeTempDir('hallmark-p11key-');
    const env: NodeJS.ProcessEnv = { ...process.env, ...token.env, PKCS11_MODULE_PATH: token.module };
    const p11 = ['--module', token.module, '--token-label', token.token];
    await tool('pkcs11-tool', [...p11, '--login', '--pin', token.pin, '--keypairgen', '--key-type', 'EC:prime256v1', '--id', keyId, '--label', keyLabel], env, '--keypairgen');
    const pubPath = join(scratch.path, 'token-public-key.der');
    await tool('pkcs11-tool', [...p11, '--read-object', '--type', 'pubkey', '--id', keyId, '--output-file', pubPath], env, '--read-object --type pubkey');
    const raw = await readFile(pubPath);
    let publicKey;
    try {
      publicKey = createPublicKey({ key: raw, format: 'der', type: 'spki' });
    } catch (err) {
      throw new Error(`pkcs11-tool did not return a DER SubjectPublicKeyInfo (${raw.length} bytes: ${raw.subarray(0, 16).toString('hex')}…)`, { cause: err });
    }
    const publicKeySpkiDer = publicKey.export({ format: 'der', type: 'spki' });
    const publicKeyPem = publicKey.export({ format: 'pem', type: 'spki' }).toString();

    const base = `pkcs11:token=${uriEscape(token.token)};object=${uriEscape(keyLabel)};id=${hexToUriId(keyId)}`;
    const keyUri = `${base};type=private;pin-value=${uriEscape(token.pin)}`;
    const publicKeyUri = `${base};type=public`;
    const opensslArgs = ['-engine', 'pkcs11', '-keyform', 'engine'] as const;
    const dir = scratch.path;
    const scratchDir = scratch;
    let cleaned = false;
    return {
      keyUri,
      publicKeyUri,
      publicKeySpkiDer,
      publicKeyPem,
      env,
      opensslArgs,
      opensslKeyArgs: [...opensslArgs, '-key', keyUri],
      token,
      dir,
      curlArgs: (certPath: string) => ['--engine', 'pkcs11', '--key-type', 'ENG', '--key', keyUri, '--cert', certPath],
      async cleanup() {
        if (cleaned) return;
        cleaned = true;
        await scratchDir.cleanup();
        if (ownToken) await token.cleanup();
      },
    };
  } catch (err) {
    await scratch?.cleanup();
    if (ownToken) await token.cleanup().catch(() => {});
    throw err;
  }
}

/**
 * softHsmOpensslKey, or undefined after marking `t` skipped (bridge unavailable, not under CI=true).
 * Under CI=true an unavailable bridge fails the test. The caller must call cleanup() (or use t.after).
 */
export async function softHsmOpensslKeyOrSkip(t: TestContext, options: SoftHsmOpensslKeyOptions = {}): Promise<SoftHsmOpensslKey | undefined> {
  const reason = opensslPkcs11Unavailable();
  if (reason) {
    if (process.env.CI === 'true') assert.fail(`${reason} (required under CI=true)`);
    t.skip(reason);
    return undefined;
  }
  return softHsmOpensslKey(options);
}

/** A subject as openssl's -subj string ('/CN=dev-1/O=Acme') or as [shortName, value] pairs in order. */
export type CsrSubject = string | ReadonlyArray<readonly [string, string]>;

export interface CsrExtras {
  /** PKCS#9 challengePassword attribute (the EST one-time password). No trailing whitespace or control characters. */
  readonly challengePassword?: string;
  /** Extra `-addext` values, e.g. 'subjectAltName=DNS:dev-1'. */
  readonly addext?: readonly string[];
  /** OpenSSL string_mask; default utf8only (UTF8String for everything, challengePassword included). */
  readonly stringMask?: 'utf8only' | 'default' | 'pkix' | 'nombstr';
}

/** Parses openssl's -subj syntax: '/type=value/…', backslash escapes; multi-valued RDNs are not supported. */
export function parseOpensslSubject(subject: string): Array<[string, string]> {
  if (!subject.startsWith('/')) throw new Error(`subject must look like /CN=…/O=…, got ${JSON.stringify(subject)}`);
  const parts: string[] = [];
  let current = '';
  for (let i = 1; i < subject.length; i++) {
    const c = subject[i]!;
    if (c === '\\' && i + 1 < subject.length) current += subject[++i];
    else if (c === '/') { parts.push(current); current = ''; }
    else if (c === '+') throw new Error('multi-valued RDNs (+) are not supported');
    else current += c;
  }
  parts.push(current);
  return parts.filter((p) => p !== '').map((p) => {
    const eq = p.indexOf('=');
    if (eq <= 0) throw new Error(`subject component without type=value: ${JSON.stringify(p)}`);
    return [p.slice(0, eq), p.slice(eq + 1)];
  });
}

/** Escapes a value for an OpenSSL config file: every non-alphanumeric character gets a backslash. */
function confValue(value: string, what: string): string {
  if (/[\u0000-\u001f\u007f]/.test(value)) throw new Error(`${what} contains control characters`);
  if (/\s$/.test(value)) throw new Error(`${what} ends in whitespace, which an OpenSSL config file cannot hold`);
  return value.replace(/[^A-Za-z0-9\u0080-\uffff]/g, (c) => `\\${c}`);
}

/**
 * Makes a PKCS#10 CSR with the token key by running `openssl req -new` through the pkcs11 engine,
 * and returns it as DER. The subject (and challengePassword, if given) come from a generated config
 * file, since `-subj` would make OpenSSL 3.0 drop the attributes.
 */
export async function makeCsrWithTokenKey(key: SoftHsmOpensslKey, subject: CsrSubject, extra: CsrExtras = {}): Promise<Buffer> {
  const rdns = typeof subject === 'string' ? parseOpensslSubject(subject) : subject.map(([k, v]) => [k, v] as [string, string]);
  if (rdns.length === 0) throw new Error('the subject needs at least one attribute');
  const lines = [
    '[req]',
    'distinguished_name = req_dn',
    'attributes = req_attrs',
    'prompt = no',
    'utf8 = yes',
    `string_mask = ${extra.stringMask ?? 'utf8only'}`,
    '[req_dn]',
    // "<n>.type" keeps repeated types (two OUs) and the order.
    ...rdns.map(([type, value], i) => {
      if (!/^[A-Za-z][A-Za-z0-9.-]*$/.test(type)) throw new Error(`bad subject attribute type ${JSON.stringify(type)}`);
      return `${i}.${type} = ${confValue(value, `subject ${type}`)}`;
    }),
    '[req_attrs]',
    ...(extra.challengePassword !== undefined ? [`challengePassword = ${confValue(extra.challengePassword, 'challengePassword')}`] : []),
    '',
  ];
  const id = randomBytes(4).toString('hex');
  const confPath = join(key.dir, `req-${id}.cnf`);
  const outPath = join(key.dir, `req-${id}.der`);
  await writeFile(confPath, lines.join('\n'));
  await tool('openssl', [
    'req', '-new', '-batch', ...key.opensslKeyArgs, '-config', confPath,
    ...(extra.addext ?? []).flatMap((e) => ['-addext', e]),
    '-outform', 'DER', '-out', outPath,
  ], key.env, 'req -new (pkcs11 engine)');
  return readFile(outPath);
}

/**
 * A self-signed certificate for the token key (`openssl req -x509` through the engine), PEM, written
 * into key.dir; returns its path. Handy as a TLS client certificate.
 */
export async function makeSelfSignedCertWithTokenKey(key: SoftHsmOpensslKey, subject: string, options: { readonly days?: number; readonly addext?: readonly string[] } = {}): Promise<string> {
  const outPath = join(key.dir, `self-${randomBytes(4).toString('hex')}.pem`);
  await tool('openssl', [
    'req', '-x509', '-batch', ...key.opensslKeyArgs, '-subj', subject, '-days', String(options.days ?? 1),
    ...(options.addext ?? []).flatMap((e) => ['-addext', e]),
    '-out', outPath,
  ], key.env, 'req -x509 (pkcs11 engine)');
  return outPath;
}
