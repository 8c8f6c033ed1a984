"""msstore under agent frameworks: each subpackage needs its framework's extra.

``msstore.integrations.langgraph`` (``pip install 'msstore[langgraph]'``): a LangGraph
checkpointer whose checkpoints are acknowledged by NATS JetStream KV and made durable in
PostgreSQL by msstore's write-behind.
"""
