"""The gRPC door: ChatService (protos/chat/v1/chat_service.proto) over NATS."""
