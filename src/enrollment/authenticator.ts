// How a device proves who it is when it asks for an operational certificate. One interface, one file
// per way (birth certificate, registered key, claim, current certificate); the enrolment service
// (enrolment.ts) picks the ones whose credential the request carries and the authority core decides
// and signs. An authenticator only establishes identity: it never signs and never decides policy
// (state, quota, rekey — those are the authority's).

import type { KeyObject } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import type { ParsedCsr } from '../pki/csr.js';
import type { Store } from '../store/database.js';
import type { ProcedureCall } from '../store/procedures.js';
import type { Registry } from '../registry/registry.js';
import type { RateLimiter } from './rate-limit.js';

export type EnrolmentOperation = 'enroll' | 'reenroll' | 'serverkeygen';

export interface ChannelBinding {
  readonly type: 'tls-unique' | 'tls-exporter';
  readonly value: Buffer;
}

export interface EnrolmentRequest {
  readonly operation: EnrolmentOperation;
  /** EST label (/.well-known/est/<label>/…): a product or line name the device must belong to. */
  readonly label?: string;
  /** The CSR, its signature already verified. */
  readonly csr: ParsedCsr;
  /** The CSR's verified public key. */
  readonly csrKey: KeyObject;
  /** The CSR's public key as canonical SPKI DER. */
  readonly csrSpki: Buffer;
  /** The client certificate chain from the TLS handshake, leaf first (DER). The handshake proved possession of the leaf's key. */
  readonly peerChain: readonly Buffer[];
  /** The HTTP Authorization header, if any. */
  readonly authorization?: string;
  readonly channelBinding?: ChannelBinding;
  /** Client address, for the audit log and rate limits. */
  readonly source: string;
}

export interface EnrolmentIdentity {
  readonly authenticator: AuthenticatorName;
  readonly udid: string;
  /** Keys the device proved it holds (its registered key, its current certificate's key). */
  readonly provenKeys: readonly Buffer[];
  /** Who asks, as the audit log records it. */
  readonly actor: string;
  readonly details: Readonly<Record<string, unknown>>;
  /** Procedures run inside the issuance transaction (a claim takes its use there), their audit entries appended with it. */
  readonly steps?: readonly ProcedureCall[];
  /** Not registered yet: the authority registers this key in this batch with the issuance (claims on batches that accept unregistered keys). */
  readonly newDevice?: { readonly batch: string; readonly publicKeySpki: Buffer };
  /** Whether the batch of a device registered on first use requires approval, when the authenticator read it already (saves a read). */
  readonly batchRequiresApproval?: boolean;
  /** Set by the current-certificate authenticator: the certificate being renewed. */
  readonly renewal?: { readonly serial: string; readonly notBefore: Date; readonly notAfter: Date };
}

/**
 * A refusal meaning "this credential is not mine to judge" (a client certificate another authority
 * issued, for the current-certificate authenticator): reported only when no other authenticator says more.
 */
export class NotApplicable extends HallmarkError {}

export type AuthenticatorName = 'birth-certificate' | 'registered-key' | 'claim' | 'current-certificate';

export interface AuthenticatorContext {
  readonly store: Store;
  readonly registry: Registry;
  readonly limiter: RateLimiter;
}

export interface EnrolmentAuthenticator {
  readonly name: AuthenticatorName;
  /** Whether the request carries this authenticator's kind of credential at all (cheap; no I/O). */
  presentIn(request: EnrolmentRequest): boolean;
  /** Establishes the device's identity, or throws a HallmarkError saying why not. */
  authenticate(request: EnrolmentRequest, context: AuthenticatorContext): Promise<EnrolmentIdentity>;
}
